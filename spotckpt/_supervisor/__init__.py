"""``spotckpt run``: the supervisor that keeps an unmodified training command safe.

Process layer. :class:`Supervisor` (:mod:`._supervisor`) pulls, starts the command
(:mod:`._child`), syncs while it runs and flushes at its end (:mod:`._end`); it is safe as
PID 1 of a container: signals go to the command's whole process tree and orphans are reaped
(:mod:`._proctree`), and a wake-up pipe ends its waits at once (:mod:`._wakeup`).
"""
from __future__ import annotations

from ._child import resolve_command
from ._supervisor import Supervisor

__all__ = ["Supervisor", "resolve_command"]
