"""Interruptions: where notices come from, how the flush is planned, how the process ends.

Source layer, no ML imports. Sources record a :class:`Notice` with its deadline and never
save anything: signals and the supervisor's lifeline (:mod:`._board`), cloud metadata
endpoints (:mod:`._metadata`). :class:`FlushPlanner` (:mod:`._planner`) fits the flush to the
deadline; :class:`Interrupt` (:mod:`._interrupt`) is the Checkpointer's side of a notice;
:mod:`._exit` holds every exit status and the watchdog that ends the process in time.
"""
from __future__ import annotations

from . import _exit
from ._board import LIFELINE_ENV, LifelineSource, Notice, NoticeBoard, SignalSource
from ._exit import EXIT_INTERRUPTED, EXIT_STALE, EXIT_USAGE
from ._interrupt import FLUSH_MARGIN, Interrupt
from ._metadata import MetadataWatcher, sources_from_env
from ._planner import OVERHEAD as PLAN_OVERHEAD, SAFETY as PLAN_SAFETY, FlushPlanner

__all__ = ["EXIT_INTERRUPTED", "EXIT_STALE", "EXIT_USAGE", "FLUSH_MARGIN", "LIFELINE_ENV", "FlushPlanner",
           "Interrupt", "LifelineSource", "MetadataWatcher", "Notice", "NoticeBoard", "PLAN_OVERHEAD", "PLAN_SAFETY",
           "SignalSource", "_exit", "sources_from_env"]
