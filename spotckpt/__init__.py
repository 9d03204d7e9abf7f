"""spotckpt: managed-spot-style checkpointing for any training container.

Public surface (everything else is internal):

- :class:`Checkpointer`: context manager around a training loop.
- :class:`Notice`: an interruption notice with its deadline.
- the error types below.
"""
from __future__ import annotations

from spotckpt._checkpointer import Checkpointer
from spotckpt._notices import Notice

from ._errors import (
                      CheckpointLockedError,
                      ConfigError,
                      CorruptCheckpointError,
                      LocalDirError,
                      MissingDependencyError,
                      NoCheckpointError,
                      RemoteError,
                      SpotckptError,
                      StaleGenerationError,
                      UnsupportedStateError,
                      WorldSizeError,
)
from ._version import __version__

__all__ = [
    "Checkpointer", "Notice", "SpotckptError", "ConfigError", "LocalDirError", "RemoteError",
    "NoCheckpointError", "CorruptCheckpointError", "CheckpointLockedError",
    "MissingDependencyError", "UnsupportedStateError", "WorldSizeError", "StaleGenerationError",
    "__version__",
]
