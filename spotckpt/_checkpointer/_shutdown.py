"""Closing a :class:`~spotckpt.Checkpointer`: the last flush within the time left, then
the teardown of what ``open()`` started (metadata watcher, signal handlers, lifeline,
writer, process groups, the local dir's lock and the lineage's claim).

User-API layer: a mixin of :class:`~spotckpt._checkpointer.Checkpointer`, the counterpart
of :mod:`._startup` (``open``).
"""
from __future__ import annotations

import threading

from spotckpt._errors import RemoteError, StaleGenerationError
from spotckpt._events import log
from spotckpt._notices import EXIT_INTERRUPTED, FLUSH_MARGIN as _FLUSH_MARGIN, _exit

from . import _distributed, _lineage


class Shutdown:
    """``close()`` for the Checkpointer (whose ``__init__`` sets the attributes used here;
    ``close`` itself, documented, is the Checkpointer's)."""

    def _close(self, timeout: float | None, *, raise_errors: bool) -> None:
        """:meth:`Checkpointer.close`: the interruption save of a notice that came after the
        last step boundary, the writer's last job, the uploads within ``timeout`` (none
        after an interruption flush, the notice's time left otherwise), then the teardown;
        a newer generation's takeover wins over any other error."""
        if not self._open:
            return
        err: BaseException | None = None
        try:
            try:
                if self.notice is not None and not self.interrupted and self._dist is None:
                    # a notice that came after the last step boundary (ranks: that boundary was
                    # the last agreement; another would wait for ranks that are closing)
                    self._interrupt_save()
            finally:
                self._open = False  # (after: that save needs the Checkpointer open)
            if self._writer is not None:
                self._writer.wait()
            self.events.emit("closing", step=self._last_saved, durable_step=self.durable_step)
            ok = True
            if self._syncer is not None:
                notice = self.notice
                if self.interrupted:
                    timeout = 0.0  # the interruption flush waited for what fits; no more
                elif notice is not None:
                    timeout = max(0.0, notice.seconds_left(self.clock) - _FLUSH_MARGIN)
                ok = self._syncer.close(timeout, join=0.0 if self.interrupted else None, bound=self._late_bound)
                if not ok:
                    problem = self._syncer.last_error or RemoteError(
                        f"spotckpt: uploads to {self.config.remote} did not finish in time")
                    if self.interrupted or self.notice is not None:
                        # exit (143) by the deadline; the interruption flush logged what is durable
                        log.warning("spotckpt: uploads still running are abandoned (durable step: %s)",
                                    self.durable_step)
                    else:
                        err = problem
            self._late_notice(ok)
        except BaseException as e:  # noqa: BLE001
            err = e
        finally:
            self._teardown()
        if self._syncer is not None and self._syncer.stale is not None:
            err = StaleGenerationError(str(self._syncer.stale))  # whatever else went wrong
        if err is not None:
            if raise_errors:
                raise err
            if not isinstance(err, StaleGenerationError):  # (_leave_stale says that one itself)
                # leaving on another error (the loop's, or a framework's exit): say what this was
                log.error("spotckpt: closing the Checkpointer failed too: %s: %s", type(err).__name__,
                          err)

    def _late_bound(self) -> float | None:
        """While close flushes: a notice that came meanwhile bounds the flush by its deadline."""
        n = self.notice
        return None if n is None or self.interrupted else n.seconds_left(self.clock) - _FLUSH_MARGIN

    def _late_notice(self, durable: bool) -> None:
        """A notice close() did not save for (it came during close's flush, or, with ranks,
        after the last step boundary): the last save is what there is, flushed within the
        deadline; the process leaves with 143 as after an interruption save (an
        orchestrator must not read success), by the deadline whatever the load."""
        notice = self.notice
        if notice is None or self.interrupted:
            return
        self.interrupted = True
        if self.exit_on_interrupt and threading.current_thread() is threading.main_thread():
            _exit.arm(notice.deadline, EXIT_INTERRUPTED, clock=self.clock)
        self.events.emit("notice", source=notice.source, step=self._last_saved, late=True,
                         seconds_left=round(notice.seconds_left(self.clock), 2))
        what = ("committed locally" if self._syncer is None else f"durable step {self.durable_step}"
                if durable else f"NOT everything is durable (durable step {self.durable_step})")
        log.warning("spotckpt: %s while closing, after the last save (step %s): %s", notice.source,
                    self._last_saved, what)
        self.events.emit("flush", action="close", step=self._last_saved, durable=durable,
                         durable_step=self.durable_step, seconds_left=round(notice.seconds_left(self.clock), 2))

    def _teardown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop(timeout=0.1 if self.interrupted else 3.0)
        if self._signals is not None:
            # leaving with 143 (from __exit__, after a notice): further signals are ignored
            self._signals.restore(until_exit=self._leaving and self.interrupted)
        if self._lifeline is not None:
            self._lifeline.stop()
            self._lifeline = None
        if self._writer is not None:
            self._writer.close()
        _distributed.release(self._dist, self._codec)  # its gloo threads joined now, not at exit
        if self._local is not None:
            self._local.unlock()
        _lineage.release(self._lineage_key)
        self._lineage_key = None
