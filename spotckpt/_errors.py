"""Error types. Each subclasses the built-in that fits, so callers can catch either.

Messages are one line that names the setting or the object and says what to do.
"""
from __future__ import annotations


class SpotckptError(Exception):
    """Base class of every error spotckpt raises on purpose."""


class ConfigError(SpotckptError, ValueError):
    """A setting is invalid (bad URL scheme, negative interval, ...)."""


class LocalDirError(SpotckptError, PermissionError):
    """The local checkpoint dir cannot be created or written."""


class RemoteError(SpotckptError, OSError):
    """The remote store failed (after retries) or cannot be used."""


class RemoteNotFoundError(RemoteError, FileNotFoundError):
    """The remote bucket or path does not exist."""


class RemoteAccessError(RemoteError, PermissionError):
    """The remote refused access (credentials or policy)."""


class NoCheckpointError(SpotckptError, FileNotFoundError):
    """No committed checkpoint exists where one was required."""


class CorruptCheckpointError(SpotckptError, ValueError):
    """A checkpoint failed verification (size, checksum or manifest)."""


class UnsupportedStateError(SpotckptError, TypeError):
    """The state holds a value that a checkpoint could not restore (raised at the save)."""


class CheckpointLockedError(SpotckptError, BlockingIOError):
    """Another process already uses this local checkpoint dir, or another open Checkpointer
    of this process writes the same remote lineage (remote and ``name``)."""


class StaleGenerationError(SpotckptError, RuntimeError):
    """A newer start of this job (a replacement, a second launch) claimed a newer generation
    on the remote: this instance stops before it overwrites or deletes anything of it. As a
    process it exits with status 3 (``spotckpt._notices.EXIT_STALE``)."""


class StaleLocalError(SpotckptError, RuntimeError):
    """The local dir is older than the remote (another instance took the job further while it
    sat out) and the command cannot defer to the remote (``spotckpt push``, ``spotckpt run
    --no-pull``): it refuses before it writes anything. As a process it exits with status 3
    (``spotckpt._notices.EXIT_STALE``)."""


class MissingDependencyError(SpotckptError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def missing(package: str, extra: str) -> MissingDependencyError:
    """Build the error for a missing optional dependency.

    Example:
        >>> raise missing("xgboost", "xgboost")  # doctest: +SKIP
    """
    return MissingDependencyError(
        f"spotckpt: this feature needs '{package}', which is not installed; "
        f"run: pip install 'spotckpt[{extra}]'"
    )


class WorldSizeError(ConfigError):
    """The newest checkpoint was written by another world size and cannot be resharded
    (its state is per rank, or this job's state is not sharded)."""
