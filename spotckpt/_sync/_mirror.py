"""The Syncer's watched-dir passes: when the next one is due, and running one.

Sync layer. Idle passes come every ``scan_interval`` s, stretched so that scanning a big tree
costs at most ``_IDLE_CPU`` of a core; a file closed in the dir (inotify,
:class:`spotckpt._watch.Changes`) brings the next pass forward at once, paced by
:func:`spotckpt._watch.next_pass_in`; a flush runs a full pass at once.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from spotckpt._watch import next_pass_in

_IDLE_CPU = 0.005          # share of a core an idle Syncer may spend scanning the local dir


class MirrorDriver:
    """Mixed into :class:`._syncer.Syncer` (its ``_cv``, ``watcher`` and pass counters)."""

    _cv: threading.Condition
    watcher: Any
    scan_interval: float
    _scan_cost: float
    _last_scan: float
    _changed: bool
    _mirror_more: bool
    bytes_uploaded: int
    upload_seconds: float

    def _on_change(self) -> None:
        """A file in the watched dir was closed, moved in or deleted (inotify's thread)."""
        with self._cv:
            self._changed = True
            self._cv.notify_all()

    def _idle_interval(self) -> float:
        """Seconds between idle mirror passes: ``scan_interval``, stretched so that scanning
        a big tree costs at most ``_IDLE_CPU`` of a core (10,000 files: a ~30 ms pass every
        few seconds instead of every 2 s). A flush always runs a full pass at once."""
        return max(self.scan_interval, self._scan_cost / _IDLE_CPU)

    def _mirror_pass(self, *, force: bool) -> None:
        w = self.watcher
        assert w is not None
        with self._cv:
            self._changed = False  # a close from here on is seen by the next pass
        n0, s0 = w.bytes_uploaded, w.upload_seconds
        try:
            w.settle = force  # a flush waits (<= 1 s) for a file emptied just before it
            self._mirror_more = not w.run_pass()
        finally:
            self._last_scan = time.monotonic()
            if not force:
                self._scan_cost = w.scan_cpu  # the scan's cost, not the uploads' (bench/ row 8)
            self.bytes_uploaded += w.bytes_uploaded - n0
            self.upload_seconds += w.upload_seconds - s0

    def _next_pass_in(self) -> float:
        """Seconds to the next mirror pass: the idle interval after the last one; once a file
        was closed (inotify), at once, paced to ``EVENT_CPU`` of a core (<= the scan interval)."""
        return next_pass_in(time.monotonic() - self._last_scan, self._changed, self._idle_interval(),
                            self.scan_interval, self._scan_cost)
