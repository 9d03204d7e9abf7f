"""What one Checkpointer owns: its lineage of ``step-N`` checkpoints, and its step numbers.

User-API layer. A *lineage* is the sequence of checkpoints one Checkpointer commits: the
unnamed one at ``<local_dir>/`` and ``<remote>``, one named ``X`` at ``<local_dir>/ckpt-X/``
and ``<remote>ckpt-X/`` (same layout below). Two rules keep a lineage meaningful:

- one live writer per lineage in a process: a second Checkpointer on the same remote URL and
  name would overwrite the first's ``step-N`` objects, and a restart would load one's
  checkpoint into the other's state (:func:`claim`);
- steps only grow: "latest" is the highest committed step, so a save below it would never be
  restored (:func:`check_step`).
"""
from __future__ import annotations

import operator
import os
import threading
from typing import Any

from spotckpt._commit import MAX_STEP
from spotckpt._errors import CheckpointLockedError, ConfigError

# (pid, remote URL) -> the Checkpointer that writes it; the pid: a forked child inherits this
# dict but not the parent's open Checkpointers
_live: dict[tuple[int, str], str] = {}
_live_lock = threading.Lock()


def describe(state: Any, local_dir: Any, name: str | None) -> str:
    keys = sorted(map(str, state)) if hasattr(state, "keys") else "?"
    named = "" if name is None else f"name={name!r}, "
    return f"Checkpointer({named}state keys {keys}, local_dir '{local_dir}')"


def claim(remote: str | None, who: str) -> tuple[int, str] | None:
    """Register the lineage at ``remote`` (its URL, ``ckpt-<name>/`` included) as written by
    ``who`` in this process.

    Without a remote the local dir's lock does this job. Returns the key for :func:`release`.

    Raises:
        CheckpointLockedError: another open Checkpointer of this process writes it.
    """
    if remote is None:
        return None
    key = (os.getpid(), remote)
    with _live_lock:
        other = _live.get(key)
        if other is not None:
            raise CheckpointLockedError(
                f"spotckpt: cannot open {who}: {other} already writes checkpoints to {remote} "
                "in this process; the two would overwrite each other's step-N checkpoints and a "
                "restart would load one's state into the other. Give each Checkpointer its own "
                "name= (e.g. name='ema'), or close the first one before opening the second")
        _live[key] = who
    return key


def release(key: tuple[int, str] | None) -> None:
    if key is not None:
        with _live_lock:
            _live.pop(key, None)


def check_step(step: Any, newest: int | None) -> int:
    """``step`` as an int, if it can name a checkpoint after ``newest`` (the lineage's newest
    step: restored or saved by this Checkpointer).

    Raises:
        ConfigError: not a whole number, out of ``0..MAX_STEP``, or below ``newest``.
    """
    try:
        s = operator.index(step)
    except TypeError:
        raise ConfigError(f"spotckpt: step {step!r} is not a whole number; ckpt.step counts "
                          "completed training steps") from None
    if not 0 <= s <= MAX_STEP:
        raise ConfigError(
            f"spotckpt: step {s} is out of range: checkpoint steps run from 0 to {MAX_STEP} "
            "(they name step-<12 digits>); count optimizer steps in ckpt.step and keep a "
            "bigger counter (tokens, samples) in the state, e.g. state['tokens']")
    if newest is not None and s < newest:
        raise ConfigError(
            f"spotckpt: step went backwards: this is step {s} but this Checkpointer's lineage "
            f"already has step {newest}, so a restart would resume from step {newest}, not from "
            f"here. Steps only grow within a lineage: for a phase that counts from 0 again, "
            "open another Checkpointer with its own name= (e.g. name='phase2'), or keep counting")
    return s
