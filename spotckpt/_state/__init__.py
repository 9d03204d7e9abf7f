"""What a checkpoint holds: the training state as bytes, and back.

Format layer. A CPU snapshot of the user's objects taken in the training thread
(:mod:`._snapshot`), the encoding of plain values that both serialisers load safely
(:mod:`._values`, :mod:`._values_decode`), sharded states through
``torch.distributed.checkpoint`` (:mod:`._dcp`) and a data loader's exact position
(:mod:`._batches`).

torch is imported only where a torch object is met: ``_dcp``'s names load on first use
(PEP 562), so an XGBoost or Keras user never pays for torch.
"""
from __future__ import annotations

from typing import Any

from . import _batches, _snapshot
from ._batches import KEY as BATCHES_KEY, Batches, Registry
from ._snapshot import PlainCodec

__all__ = ["BATCHES_KEY", "Batches", "PlainCodec", "Registry", "ShardedCodec", "_batches", "_snapshot",
           "sharded_keys"]

_TORCH_ONLY = {"ShardedCodec", "sharded_keys"}  # in _dcp, which imports torch at its top


def __getattr__(name: str) -> Any:
    if name in _TORCH_ONLY:
        from . import _dcp

        return getattr(_dcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
