"""``every="auto"`` inside the Checkpointer: measure, decide, record.

User-API layer: a mixin of :class:`~spotckpt._checkpointer.Checkpointer`. It times the
steps at the step boundaries the Checkpointer already sees (no timer in user code) and the
stall of each save, feeds them to a :class:`._schedule.CostMeter`, reads the job's
incarnation history (the remote's ``history.json``, :mod:`spotckpt._remote._history`; under
``spotckpt run`` the copy the supervisor leaves in the state dir), and makes the
:class:`._policies.AutoInterval` policy. Each decision goes to the events log
(``schedule``), to ``<state dir>/schedule.json`` (for ``spotckpt status``) and into this
incarnation's history record; how the incarnation ended is recorded at the end.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from spotckpt._cadence import Schedule
from spotckpt._commit import LocalDir, write_atomic
from spotckpt._config import on_sagemaker, supervised
from spotckpt._events import log
from spotckpt._remote import Recorder, _history

from ._policies import AutoInterval
from ._rate import CHANGE_PRIOR, failure_rate, stretches
from ._schedule import USABLE_NOTICE, CostMeter, Decision, decide, fits

SCHEDULE_FILE = "schedule.json"       # the decision in force, in the state dir
SUPERVISED_HISTORY = "history.json"   # the supervisor's copy of the history, in the state dir


def _startup_seconds() -> float | None:
    """Seconds from this process's start to now (the start-up an interruption costs again)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - informational only
        return None


class _Auto:
    """The state of ``every="auto"`` for one open Checkpointer."""

    def __init__(self, sched: Schedule, *, clock: Any, grace: float, grace_source: str, state_dir: Path,
                 shared_state: Path) -> None:
        self.sched, self.clock, self.grace, self.grace_source = sched, clock, grace, grace_source
        self.meter = CostMeter()
        self.t_open = clock()
        self.state_dir = state_dir            # this lineage's (and rank's) state dir: schedule.json
        self.shared_state = shared_state      # the local dir's state dir: the supervisor's copy
        self.recorder: Recorder | None = None
        self.history_note = "no history (no remote)"
        self.local_copy: dict[str, Any] | None = None  # the summary from the supervisor (or rank 0)
        self.supervised = False
        self.last_tick: float | None = None
        self.stall = 0.0                      # seconds of saves since the last tick
        self.last_bytes = 0
        self.decision: Decision | None = None
        self.logged: Decision | None = None
        self.policy: AutoInterval | None = None
        self.seeded: str | None = None        # C and D taken over from the previous incarnation

    def seed(self) -> None:
        """Start from the C and D an earlier incarnation measured (the newest decision with a
        measured C in the history): a restart need not begin with the first interval again."""
        prev = self.summary().get("measured") or {}
        dec = prev.get("decision") if isinstance(prev, dict) else None
        if not isinstance(dec, dict):
            return

        def ok(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 86400.0
        if ok(dec.get("c_s")) and self.meter.c is None:
            self.meter.c = float(dec["c_s"])
            d = dec.get("d_meter_s", dec.get("d_s"))  # (as measured here: without the supervisor's upload)
            if ok(d):
                self.meter.d = float(d)
            self.seeded = f"an earlier incarnation (generation {prev.get('generation')})"

    def summary(self) -> dict[str, Any]:
        if self.recorder is not None:
            return self.recorder.summary
        if self.local_copy is not None and isinstance(self.local_copy.get("summary"), dict):
            return self.local_copy["summary"]
        return _history.summary(_history.empty())

    def read_local_copy(self) -> None:
        """Supervised: the history as the supervisor read it, and its upload rate."""
        try:
            doc = json.loads((self.shared_state / SUPERVISED_HISTORY).read_text())
        except (OSError, ValueError):
            return
        if isinstance(doc, dict) and isinstance(doc.get("summary"), dict):
            self.local_copy, self.supervised = doc, True
            self.history_note = f"history from the supervisor (generation {doc.get('generation')})"

    def record(self) -> dict[str, Any] | None:
        """The decision in force as logged and kept in the history, with the meter's own D."""
        if self.decision is None:
            return None
        return {**self.decision.to_dict(), "d_meter_s": None if self.meter.d is None else round(self.meter.d, 4)}

    def decide(self) -> Decision:
        summ = self.summary()
        ran = self.clock() - self.t_open
        t = float(summ.get("run_s") or 0.0) + ran
        m = self.meter
        d, d_src = m.d, f"measured: save to durable, moving average of {m.samples} save(s)"
        bps = (self.local_copy or {}).get("upload_bytes_per_s")
        if d is not None and self.supervised:
            if isinstance(bps, (int, float)) and bps > 0:
                d += self.last_bytes / bps
                d_src = "measured: save to local commit, plus the upload at the supervisor's measured rate"
            else:
                d_src = "measured: save to local commit (the supervisor uploads; no upload rate measured yet)"
        fit = fits(d, self.grace)
        if fit is None:
            notice = (f"platform prior: a {self.grace:g} s notice is "
                      + ("usable" if self.grace >= USABLE_NOTICE else "not taken as usable") + " until D is measured")
            fit_now = self.grace >= USABLE_NOTICE
        else:
            notice = ("a notice save fits the grace: only failures without a usable warning count" if fit else
                      "a notice save does not fit the grace: every preemption counts")
            fit_now = fit
        est = failure_rate(stretches(summ, ran, notice_fits=fit_now), self.sched.failure_rate)
        rate = est.rate
        if m.c is not None and m.samples == 0:
            c_src = d_src = f"measured by {self.seeded}, until this incarnation's first durable save"
        elif m.c is not None:
            c_src = (f"measured: stall + slowdown of the steps in the save's window, moving average of {m.samples} "
                     f"save(s)" + (f" continuing {self.seeded}" if self.seeded else ""))
        else:
            c_src = "not measured yet (no save durable so far)"
        sources = {
            "c": c_src,
            "d": d_src if d is not None else "not measured yet",
            "rate": (f"{est.note()}, {t / 3600:.3g} h over {int(summ.get('incarnations') or 0) + 1} "
                     f"incarnation(s) ({self.history_note}), "
                     f"prior: {self.sched.source}, weighted as a quarter of a failure; the rate may change at "
                     f"a restart after a failure ({100 * CHANGE_PRIOR:g}% each)"),
            "grace": self.grace_source, "notice": notice,
            "interval": (f"Young/Daly, clamped to [{self.sched.min_interval:g}, {self.sched.max_interval:g}] s, "
                         "never below the time to durable"),
        }
        if m.c is None:
            sources["interval"] = (f"first interval, before anything is measured: min_interval = "
                                   f"{self.sched.min_interval:g} s (one early save measures C)")
        return decide(c=m.c, d=d, rate=rate, grace=self.grace, lo=self.sched.min_interval,
                      hi=self.sched.max_interval, notice_fits=fit, sources=sources)


class AutoSave:
    """``every="auto"`` for the Checkpointer (whose ``__init__``/``open`` set what is used)."""

    _auto: _Auto | None = None

    def _auto_open(self, sched: Schedule, *, store: Any, fence: Any) -> AutoInterval:
        """After the restore: the grace the platform gives, the history, the policy."""
        cfg = self.config
        sources = list(getattr(self._watcher, "sources", None) or [])
        if sources:
            src = max(sources, key=lambda s: s.grace)
            grace, gsrc = float(src.grace), f"{src.name} metadata notice: {src.grace:g} s"
        else:
            grace = cfg.grace_seconds
            gsrc = (f"SageMaker's SIGTERM grace: {grace:g} s" if on_sagemaker() and grace == 120.0
                    else f"grace_seconds: {grace:g} s")
        a = self._auto = _Auto(sched, clock=self.clock, grace=grace, grace_source=gsrc,
                               state_dir=self._local.meta, shared_state=LocalDir(cfg.local_dir).meta)
        d = self._dist
        if store is not None and fence is not None and (d is None or d.rank == 0):
            try:
                a.recorder = Recorder.begin(store, fence, startup_s=_startup_seconds(), clock=self.clock)
                a.history_note = f"history.json on the remote, generation {fence.generation}"
                self.events.emit("history_begin", generation=fence.generation, **a.recorder.summary)
                a.recorder.decision = a.record
                if self._syncer is not None:
                    self._syncer.history = a.recorder  # one beat per durable checkpoint
            except Exception as e:  # noqa: BLE001 - advice only: train on with the prior
                a.history_note = f"history unavailable ({str(e).splitlines()[0][:120]})"
                log.warning("spotckpt: every='auto': the job's history could not be read (%s); using the prior",
                            str(e).splitlines()[0][:200])
        elif supervised() and cfg.name is None:
            a.history_note = "no history from the supervisor yet"
            a.read_local_copy()
        if d is not None and store is not None:  # every rank decides from rank 0's history
            summ = d.broadcast(a.recorder.summary if a.recorder is not None else None, where="the job's history")
            if d.rank != 0:
                a.history_note = "rank 0's history" if summ is not None else "no history on rank 0"
                if summ is not None:
                    a.local_copy = {"summary": summ}
        a.seed()
        a.policy = AutoInterval(a.decide, clock=self.clock, on_change=self._auto_decided)
        return a.policy

    def _auto_decided(self, dec: Decision) -> None:
        a = self._auto
        if a is None:
            return
        a.decision = dec
        rec = a.record()
        old = a.logged
        if old is None or dec.how != old.how or abs(dec.interval - old.interval) > 0.1 * old.interval:
            a.logged = dec
            self.events.emit("schedule", step=self.step, **rec)
            log.info("spotckpt: every='auto': %s", dec.line())
        try:
            write_atomic(a.state_dir / SCHEDULE_FILE, json.dumps(
                {"ts": round(time.time(), 3), "pid": os.getpid(), "step": self.step, **rec},
                default=str).encode(), sync=False)
        except OSError:
            pass

    # -- measurements ------------------------------------------------------------------------
    def _tick_in(self) -> None:
        """A step boundary: the step that just ended, less the saves made inside it."""
        a = self._auto
        if a is None:
            return
        now = self.clock()
        if a.last_tick is not None:
            n = a.meter.samples
            a.meter.step(now - a.last_tick - a.stall)
            if a.meter.samples != n and a.policy is not None:
                a.policy.refresh()  # a new sample of C and D: decide again now
        a.stall = 0.0

    def _tick_out(self) -> None:
        if self._auto is not None:
            self._auto.last_tick = self.clock()

    def _auto_saved(self, t0: float, step: int) -> None:
        """A save (or commit_dir) of ``step`` started at ``t0`` returned to the training thread."""
        a = self._auto
        if a is None:
            return
        stall = self.clock() - t0
        a.stall += stall
        a.meter.saved(stall, at=t0, step=step)

    def _auto_durable(self, step: int, *, local_commit: bool, nbytes: int | None = None) -> None:
        """``step`` is durable: uploaded (``local_commit`` False), or committed locally
        (``nbytes`` written) when nothing here uploads it. Any thread."""
        a = self._auto
        if a is None:
            return
        if nbytes:
            a.last_bytes = nbytes
        if local_commit and self._syncer is not None:
            return
        a.meter.durable(at=self.clock(), step=step)

    # -- the end -----------------------------------------------------------------------------
    def _interrupt_save(self) -> None:
        super()._interrupt_save()  # type: ignore[misc]
        a = self._auto
        if a is None or a.recorder is None or not self.interrupted:
            return
        ok = bool(getattr(self, "_flush_ok", False))
        left = self.notice.seconds_left(self.clock) - 1.5 if self.notice is not None else 1.0
        a.recorder.end("notice-saved" if ok else "notice-late", timeout=max(0.0, min(2.0, left - 0.5)))

    def _auto_finish(self, error: bool) -> None:
        """Closed without a notice: completed, or left by an error."""
        a = self._auto
        if a is None or a.recorder is None or a.recorder.ended is not None:
            return
        if self._syncer is not None and self._syncer.stale is not None:
            a.recorder.ended = "superseded"  # the newer generation owns the history now
            return
        a.recorder.end("error" if error else "completed", timeout=5.0)
