"""The interruption save: what a :class:`~spotckpt.Checkpointer` does at the step boundary
after a notice. Plan against the deadline (:mod:`._planner`), save or finish the upload in
flight, wait for it within the deadline, agree across ranks, and arm the exit that ends the
process by the deadline whatever the load (:mod:`._exit`).

User-API layer: a mixin of :class:`~spotckpt._checkpointer.Checkpointer` (whose
``__init__``/``open`` set the attributes used here).
"""
from __future__ import annotations

import dataclasses
import sys
import threading

from spotckpt._errors import StaleGenerationError
from spotckpt._events import log

from . import _exit
from ._exit import EXIT_INTERRUPTED, EXIT_STALE
from ._planner import PLAN_ACTIONS, finish_uploads

FLUSH_MARGIN = 1.5      # seconds kept back from the deadline for process exit (_notices/_exit.py)


class Interrupt:
    """``_interrupt_save()`` for the Checkpointer, and leaving when a newer instance of the
    job took over the remote (:mod:`spotckpt._remote._fence`)."""

    def _check_stale(self) -> None:
        """Raises :class:`StaleGenerationError` once the Syncer met a newer generation."""
        stale = self._syncer.stale if self._syncer is not None else None
        if stale is not None:
            raise StaleGenerationError(str(stale)) from None

    def _close_or_leave(self) -> None:
        """``close()``, leaving by :meth:`_leave_stale` if a newer generation took over."""
        try:
            self.close()
        except StaleGenerationError as e:
            self._leave_stale(e)

    def _leave_stale(self, e: BaseException) -> None:
        """Close without uploading anything more, then leave: one line on stderr and exit
        status ``EXIT_STALE`` (3), or re-raise ``e`` with ``exit_on_interrupt=False``."""
        self.close(timeout=0.0, raise_errors=False)
        if not self.exit_on_interrupt:
            raise e
        sys.stderr.write(f"spotckpt.StaleGenerationError: {e}\n")
        sys.stderr.flush()
        raise (_exit.Leaving(EXIT_STALE) if _exit.armed() else SystemExit(EXIT_STALE)) from None

    def _interrupt_save(self) -> None:
        if self.interrupted:
            return
        if self.notice is None:  # another rank got the notice; the deadline is agreed below
            self._board.post("peer-rank", self.config.grace_seconds)
        notice = self.notice
        assert notice is not None
        self.interrupted = True
        if self._signals is not None:  # a second SIGTERM, a Ctrl-C: never cut this save short
            self._signals.shield()
        if self.exit_on_interrupt and threading.current_thread() is threading.main_thread():
            # from here on the process is leaving: gone by the deadline, whatever the load
            _exit.arm(notice.deadline, EXIT_INTERRUPTED, clock=self.clock)
        t0 = self.clock()
        left = notice.seconds_left(self.clock)
        self.events.emit("notice", source=notice.source, step=self.step, seconds_left=round(left, 2))
        assert self._writer is not None
        self._writer.wait()  # a periodic save in flight counts as committed for the plan
        saved = self._last_saved == self.step
        undurable = self._syncer is not None and bool(self._syncer.busy_steps())
        # plan with the time the flush may take: what is left now, less the exit's margin
        plan = self._planner.decide(notice.seconds_left(self.clock) - FLUSH_MARGIN, unsaved_work=not saved,
                                    undurable_commit=undurable,
                                    queued_s=self._planner.queued_seconds(self._syncer))
        if self._dist is not None:  # every rank follows the most careful plan, earliest deadline
            neg_left, code = self._dist.agree_max([-left, PLAN_ACTIONS.index(plan.action)],
                                                  where="the interruption plan")
            if -neg_left < left:
                left = -neg_left
                self._board.post_deadline(notice.source, self.clock() + left)
                notice = self.notice
                if _exit.armed():
                    _exit.arm(notice.deadline, EXIT_INTERRUPTED, clock=self.clock)
            plan = dataclasses.replace(plan, action=PLAN_ACTIONS[int(code)], seconds_left=left)
        self.events.emit("plan", action=plan.action, estimate_s=plan.estimate,
                         seconds_left=round(left, 2), reason=plan.reason)
        log.warning("spotckpt: %s received at step %d, %.1f s left: %s", notice.source, self.step,
                    left, plan.reason)
        if plan.action == "save" and self.state is not None:  # (state=None: commit_dir did)
            self.save(blocking=True)
        ok = True
        if self._syncer is not None:
            budget = max(0.0, notice.seconds_left(self.clock) - FLUSH_MARGIN)
            ok = finish_uploads(self._syncer, plan.action, budget, self.config.remote,
                                current=self.step if saved else None)
        self._flush_ok = ok
        self.events.emit("flush", action=plan.action, step=self.step, durable=ok,
                         durable_step=self.durable_step, estimate_s=plan.estimate,
                         actual_s=round(self.clock() - t0, 3),
                         seconds_left=round(notice.seconds_left(self.clock), 2))
        if self._dist is not None:  # leave together, so no rank is killed mid-flush
            self._dist.agree_max([0], where="exit after the interruption save")
        self._after_interrupt_save()

    def _after_interrupt_save(self) -> None:
        """Say which signals were ignored meanwhile; without ``exit_on_interrupt`` the
        process goes on, so they interrupt again from now on."""
        if self._signals is None:
            return
        ignored = self._signals.take_ignored()
        if ignored:
            log.warning("spotckpt: %s during the interruption save: ignored (the interruption save goes on)",
                        ", ".join(dict.fromkeys(ignored)))
            self.events.emit("signal_ignored", signals=ignored, step=self.step)
        if not self.exit_on_interrupt:
            self._signals.unshield()
