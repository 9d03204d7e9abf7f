"""``every="auto"``: the checkpoint interval chosen from measured costs and the job's own
interruption history (Young 1974, Daly 2006).

User-API layer, no I/O: numbers in, a :class:`Decision` out; the Checkpointer feeds it
(:mod:`._autosave`) and the policy acts on it (:class:`._policies.AutoInterval`).

The inputs:

- **C**, the cost of one checkpoint in training time: the training thread's stall in the
  save plus the slowdown of the steps that ran while the background write and upload ran
  (their durations against those of the steps outside such a window), a moving average
  (:class:`CostMeter`). **D**, the time from a save's start until it is durable.
- **λ**, the rate of failures *without a usable warning*, per second of training
  (:mod:`._rate`): ``(n + a) / (T + a / r0)`` where ``n`` counts the earlier incarnations
  that ended without a completed notice save (killed without notice, or the notice save was
  too late), ``T`` is the job's running time (the history's, plus this incarnation's),
  ``r0`` the prior rate (``failure_rate=`` / ``mtbf=``; the default, one per 2 h of
  training, is conservative) and ``a`` = :data:`PRIOR_WEIGHT` its weight in failures (a
  quarter); ``n`` and ``T`` count since the current rate began, averaged over where it may
  have begun with the posterior weight of each restart (:func:`._rate.failure_rate`, a
  Bayesian change-point model: the rate may change at a restart after a failure with
  probability :data:`CHANGE_PRIOR`); with no evidence of a change, the whole history. The prior
  keeps the first intervals short, halves after half an hour without a failure, and the
  job's own record decides within hours. When no failure ever comes, what the prior costs
  is bounded: at most ``a · max_interval / 2`` of extra checkpoint overhead over the whole
  job (15 minutes with the defaults), whatever C: exactly ``a·(max − τ0)²/(2·max)`` for
  ``τ0`` the interval at the prior's rate. If a notice save does not fit the grace
  (``D`` x the planner's safety, plus its overhead, is more than the grace less the exit
  margin), every preemption counts: the completed notice saves are added to ``n``.
  Before ``D`` is measured the platform decides: a 2-minute notice (EC2, SageMaker) is
  taken as usable, a 30 s one (GCP, Azure, the default grace) is not.
- **τ**, the interval: Daly's higher-order optimum
  ``τ = √(2CM)·(1 + ⅓√(C/2M) + C/18M) − C`` for ``C < 2M`` (``M = 1/λ``), else ``M``;
  for ``C ≪ M`` it is Young's ``√(2C/λ)``. Then clamped to ``[min_interval,
  max_interval]`` and never below ``D``. Before C is measured: ``min_interval`` (60 s with
  the defaults): one early save measures what a save costs. A restart starts from the C
  and D its predecessor recorded in the history.
- the expected fraction of time lost, first order: ``C/τ`` (overhead) + ``λ·(τ/2 + D)``
  (rework: half an interval and the time to durable, at each failure without warning).

Example:
    >>> decide(c=2.0, d=5.0, rate=1 / 86400, grace=120, lo=60, hi=3600).interval  # doctest: +SKIP
    589.8...
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from spotckpt._notices import FLUSH_MARGIN, PLAN_OVERHEAD, PLAN_SAFETY

from ._rate import (
    CHANGE_PRIOR,
    PRIOR_WEIGHT,
    Rate,
    counted,
    failure_rate,
    regimes,
    stretches,
    unwarned_rate,
)

SMOOTHING = 0.3       # moving estimate of C and D: weight of the newest save
USABLE_NOTICE = 120.0  # a platform notice this long (EC2's two minutes) is taken as usable until D is measured


def young(c: float, rate: float) -> float:
    """Young's interval ``√(2C/λ)`` (seconds)."""
    return math.sqrt(2.0 * c / rate)


def daly(c: float, rate: float) -> float:
    """Daly's higher-order optimum (2006, eq. 37): ``√(2CM)·(1 + ⅓√(C/2M) + C/18M) − C`` for
    ``C < 2M``, else ``M`` (``M = 1/λ``, the mean time between failures)."""
    m = 1.0 / rate
    if c >= 2.0 * m:
        return m
    x = c / (2.0 * m)
    return math.sqrt(2.0 * c * m) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - c


def first_interval(lo: float, hi: float) -> float:
    """The interval before anything is measured: ``lo``, so that one early save measures C
    (bench/schedule.py: a first interval of sqrt(lo x hi) cost up to 1.7x the best fixed
    interval on traces whose first failures come early)."""
    return lo


def fits(d: float | None, grace: float) -> bool | None:
    """Whether a notice save fits the grace, as the flush planner would plan it (None: D is
    not measured yet)."""
    if d is None:
        return None
    return d * PLAN_SAFETY + PLAN_OVERHEAD < grace - FLUSH_MARGIN


@dataclasses.dataclass(frozen=True)
class Decision:
    """The interval in force, what it was computed from, and what it is expected to cost."""

    interval: float
    how: str                      # "first", "young-daly", "min_interval", "max_interval", "time to durable"
    c: float | None               # seconds of training lost per checkpoint
    d: float | None               # seconds from a save's start to durable
    rate: float                   # λ: failures without a usable warning per second of training
    notice_fits: bool | None
    grace: float
    overhead: float | None        # C/τ
    rework: float | None          # λ·(τ/2 + D)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        """Expected fraction of training time lost (overhead + rework)."""
        return None if self.overhead is None or self.rework is None else self.overhead + self.rework

    def to_dict(self) -> dict[str, Any]:
        r = (lambda x, n=4: None if x is None else round(x, n))
        return {"interval_s": r(self.interval, 3), "how": self.how, "c_s": r(self.c), "d_s": r(self.d),
                "rate_per_hour": r(self.rate * 3600.0, 6), "notice_fits": self.notice_fits,
                "grace_s": self.grace, "overhead": r(self.overhead, 6), "rework": r(self.rework, 6),
                "fraction_lost": r(self.fraction, 6), "sources": dict(self.sources)}

    def line(self) -> str:
        """One line for the log and ``spotckpt status``."""
        return describe(self.to_dict())


def describe(d: dict[str, Any]) -> str:
    """A decision (``to_dict()``, as logged) in one line."""
    def sec(x: float | None) -> str:
        if x is None:
            return "?"
        return f"{x / 60:.1f} min" if x >= 120 else f"{x:.3g} s"
    rate = d.get("rate_per_hour") or 0.0
    mtbf = f"1 per {1 / rate:.3g} h" if rate > 0 else "none expected"
    frac = d.get("fraction_lost")
    lost = "?" if frac is None else (f"{100 * frac:.2f}% expected lost (overhead {100 * (d.get('overhead') or 0):.2f}%"
                                     f" + rework {100 * (d.get('rework') or 0):.2f}%)")
    return (f"every {sec(d.get('interval_s'))} ({d.get('how')}): C {sec(d.get('c_s'))}, "
            f"time to durable {sec(d.get('d_s'))}, failures without usable warning {mtbf}; {lost}")


def decide(*, c: float | None, d: float | None, rate: float, grace: float, lo: float, hi: float,
           notice_fits: bool | None = None, sources: dict[str, str] | None = None) -> Decision:
    """The interval for checkpoint cost ``c``, time to durable ``d``, failure ``rate``
    (per second), clamped to ``[lo, hi]`` and never below ``d``.

    Example:
        >>> decide(c=None, d=None, rate=1e-5, grace=30, lo=60, hi=3600).interval
        60
    """
    if c is None:
        tau, how = first_interval(lo, hi), "first"
    elif rate <= 0:
        tau, how = hi, "max_interval"
    else:
        tau, how = daly(c, rate), "young-daly"
        if tau < lo:
            tau, how = lo, "min_interval"
        elif tau > hi:
            tau, how = hi, "max_interval"
    if d is not None and d > tau:
        tau, how = d, "time to durable"
    overhead = None if c is None else c / tau
    rework = rate * (tau / 2.0 + (d or 0.0))
    return Decision(tau, how, c, d, rate, notice_fits, grace, overhead, rework, dict(sources or {}))


class CostMeter:
    """C and D measured from what the Checkpointer sees, with no timer in user code.

    ``step(seconds)`` after each step (the time between two step boundaries, less any
    save's stall in between), ``saved(stall, at, step)`` when a save returned to the
    training thread, ``durable(at, step)`` when a step is durable (the upload's callback;
    without a remote, its local commit; a newer step counts for the older ones). A save is
    in its *window* from its start until it is durable; the steps that end while any save
    is in its window are slowed down by the background work, and their excess over the
    moving baseline of the steps outside windows is shared by the saves open then. When a
    window closes, ``stall + its share of the excess`` is one sample of C and ``durable -
    start`` one of D; both are moving averages. Windows overlap when saves come faster than
    they become durable: each still gets its own D, which is what makes the interval grow
    to the time to durable (a new save used to close the old window unmeasured, and a first
    interval shorter than D then never measured anything).

    The first save of a process is not a sample (``warmup``): it copies into fresh buffers
    (a page fault per 4 KiB, up to 40x a memcpy: docs/design.md "Performance") and starts
    the writer; measured in ``bench/schedule.py``, it stalled 0.44 s where the next ones took
    0.03-0.1 s, and an interval chosen from it lost a whole hour of work at the first kill.

    Example:
        >>> m = CostMeter(warmup=0); m.step(1.0); m.saved(0.2, at=10.0); m.step(1.5); m.durable(at=12.0)
        >>> m.step(1.0); round(m.c, 3), m.d
        (0.7, 2.0)
    """

    MAX_OPEN = 8   # windows kept open at most (uploads failing for long: the oldest are dropped)

    def __init__(self, *, smoothing: float = SMOOTHING, warmup: int = 1) -> None:
        self.smoothing, self.warmup = smoothing, warmup
        self.c: float | None = None
        self.d: float | None = None
        self.base: float | None = None     # moving mean of a step outside a save's window
        self.samples = 0
        self._open: list[list[Any]] = []    # [stall, start, step, excess share, durable at]
        self._durable: tuple[float, int | None] | None = None   # (at, step) reported, not applied yet

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    @property
    def in_window(self) -> bool:
        return bool(self._open)

    def step(self, seconds: float) -> None:
        if seconds < 0:
            return
        if not self._open:
            self.base = self._avg(self.base, seconds)
            return
        if self.base is not None:  # the slowdown, shared by the saves in their window now
            for w in self._open:
                w[3] += (seconds - self.base) / len(self._open)
        self._apply()

    def saved(self, stall: float, *, at: float, step: int = 0) -> None:
        """A save of ``step`` returned after ``stall`` seconds in the training thread; it
        started at ``at``."""
        self._open.append([max(0.0, stall), at, step, 0.0, None])
        del self._open[:-self.MAX_OPEN]

    def durable(self, *, at: float, step: int | None = None) -> None:
        """``step`` (None: every save in its window) is durable. Any thread: one assignment,
        applied at the next step boundary."""
        self._durable = (at, step)

    def _apply(self) -> None:
        got, self._durable = self._durable, None
        if got is not None:
            at, step = got
            for w in self._open:
                if step is None or w[2] <= step:
                    w[4] = at if w[4] is None else w[4]
        while self._open and self._open[0][4] is not None:
            stall, start, _, excess, at = self._open.pop(0)
            if self.warmup > 0:
                self.warmup -= 1
                continue
            self.c = self._avg(self.c, stall + max(0.0, excess))
            self.d = self._avg(self.d, max(0.0, at - start))
            self.samples += 1


__all__ = ["CHANGE_PRIOR", "CostMeter", "Decision", "PRIOR_WEIGHT", "Rate", "counted", "daly", "decide", "describe",
           "failure_rate", "first_interval", "fits", "regimes", "stretches", "unwarned_rate", "young"]
