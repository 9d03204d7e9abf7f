"""The user API: :class:`Checkpointer`, the context manager around a training loop.

User-API layer. :mod:`._checkpointer` (save, steps, close), :mod:`._startup` (open: settings
checked, generation claimed, writer started), :mod:`._shutdown` (close: the last flush within
the time left, then the teardown), :mod:`._resume` (the newest verified state loaded into
the user's objects), :mod:`._distributed` (ranks: agreement, one part each), :mod:`._lineage`
(one writer per lineage in a process), :mod:`._policies` (when to save), :mod:`._schedule`
and :mod:`._autosave` (``every="auto"``: the interval from measured costs and the job's history).
"""
from __future__ import annotations

from ._autosave import SCHEDULE_FILE
from ._checkpointer import Checkpointer
from ._schedule import describe as describe_decision

__all__ = ["Checkpointer", "SCHEDULE_FILE", "describe_decision"]
