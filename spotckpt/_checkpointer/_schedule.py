"""``every="auto"``: the checkpoint interval chosen from measured costs and the job's own
interruption history (Young 1974, Daly 2006).

User-API layer, no I/O: numbers in, a :class:`Decision` out; the Checkpointer feeds it
(:mod:`._autosave`) and the policy acts on it (:class:`._policies.AutoInterval`).

The inputs:

- **C**, the cost of one checkpoint in training time: the training thread's stall in the
  save plus the slowdown of the steps that ran while the background write and upload ran
  (their durations against those of the steps outside such a window), a moving average
  (:class:`CostMeter`). **D**, the time from a save's start until it is durable.
- **λ**, the rate of failures *without a usable warning*, per second of training:
  ``(n + a) / (T + a / r0)`` where ``n`` counts the earlier incarnations that ended without
  a completed notice save (killed without notice, or the notice save was too late), ``T``
  is the job's running time (the history's, plus this incarnation's), ``r0`` the
  prior rate (``failure_rate=`` / ``mtbf=``; the default, one per 2 h of training, is
  conservative) and ``a`` = :data:`PRIOR_WEIGHT` its weight in failures (a quarter); ``n``
  and ``T`` count since the rate last changed (:func:`regime`, a change-point test on the
  history's incarnations; the whole history when it did not). The prior
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

PRIOR_WEIGHT = 0.25   # the prior counts as a quarter of a failure: the job's own record soon decides
CHANGE_LLR = 8.0      # the failure rate changed when two rates explain the history e^8 (~3000) times better
                      # (times the number of splits tried)
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


def counted(ended: dict[str, int], *, notice_fits: bool) -> int:
    """The failures without a usable warning among endings ``{how: count}``."""
    n = ended.get("hard-kill", 0) + ended.get("notice-late", 0)
    return n + (0 if notice_fits else ended.get("notice-saved", 0))


def unwarned_rate(ended: dict[str, int], t: float, prior: float, *, notice_fits: bool) -> tuple[float, int]:
    """λ (per second) and the number of failures it counts, from the history's endings,
    ``t`` seconds of running time and the ``prior`` rate (weight :data:`PRIOR_WEIGHT`)."""
    n = counted(ended, notice_fits=notice_fits)
    if prior > 0:
        return (n + PRIOR_WEIGHT) / (t + PRIOR_WEIGHT / prior), n
    return (n / t if t > 0 else 0.0), n


def stretches(summ: dict[str, Any], ran: float, *, notice_fits: bool) -> list[tuple[float, int]]:
    """The job's running time as ``(seconds, failures counted)`` stretches, oldest first, from
    a history summary (:func:`spotckpt._remote._history.summary`): the ended incarnations no
    longer listed as one stretch (their failures taken at its end), then each listed one (a
    failure ends it), then this one's ``ran`` seconds so far. A summary without ``runs`` (an
    older version's): the totals as one stretch."""
    runs = [r for r in (summ.get("runs") or []) if isinstance(r, (list, tuple)) and len(r) == 2]
    listed = [(max(0.0, float(s)), counted({str(how): 1}, notice_fits=notice_fits)) for s, how in runs
              if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)]
    n_all = counted(summ.get("ended") or {}, notice_fits=notice_fits)
    t_all = float(summ.get("run_s") or 0.0)
    older = (max(0.0, t_all - sum(s for s, _ in listed)), max(0, n_all - sum(n for _, n in listed)))
    return [x for x in (older, *listed) if x[0] > 0 or x[1] > 0] + [(max(0.0, ran), 0)]


def _ll(n: float, t: float) -> float:
    return n * math.log(n / t) if n > 0 and t > 0 else 0.0


def regime(parts: list[tuple[float, int]]) -> tuple[int, float]:
    """Where the current failure rate began: the index into ``parts`` (:func:`stretches`) of
    the first stretch counted, and the log-likelihood ratio of the change found there (0.0:
    none; the whole history counts).

    A Poisson change-point test: splitting the history right after a failure, into two
    stretches each with its own constant rate, is taken to be a change of rate when its
    likelihood is at least ``k·e^CHANGE_LLR`` (e^8) times that of one rate over all, ``k`` the
    number of splits tried (a Bonferroni bound: the best of many splits of an unchanged
    rate is not a change); then the stretch after the best such split is tested again. At
    least two failures are needed before any split (one failure says nothing about a
    change). Both ways: a burst that stopped stops counting, and a burst that starts after
    a long quiet stretch counts without the quiet stretch diluting it."""
    start, found = 0, 0.0
    while True:
        n = sum(f for _, f in parts[start:])
        t = sum(s for s, _ in parts[start:])
        if n < 2 or t <= 0:
            return start, found
        best, at, n1, t1, tried = 0.0, None, 0, 0.0, 0
        for i in range(start, len(parts) - 1):
            t1, n1 = t1 + parts[i][0], n1 + parts[i][1]
            if parts[i][1] and t1 > 0:
                tried += 1
                llr = _ll(n1, t1) + _ll(n - n1, t - t1) - _ll(n, t)
                if llr > best:
                    best, at = llr, i + 1
        if at is None or best < CHANGE_LLR + math.log(tried):
            return start, found
        start, found = at, best


@dataclasses.dataclass(frozen=True)
class Rate:
    """λ and what it counts: ``n`` failures without a usable warning in ``t`` seconds of
    running since the current rate began; before it, ``n_before`` in ``t_before`` (both 0:
    no change found, the whole history counts)."""

    rate: float
    n: int
    t: float
    n_before: int = 0
    t_before: float = 0.0

    def note(self) -> str:
        if not self.t_before:
            return f"{self.n} failure(s) without usable warning in {self.t / 3600:.3g} h of running"
        return (f"{self.n} failure(s) without usable warning in the last {self.t / 3600:.3g} h of running: the "
                f"rate changed after {self.n_before} in the {self.t_before / 3600:.3g} h before, "
                f"which count no more")


def failure_rate(parts: list[tuple[float, int]], prior: float) -> Rate:
    """λ (per second): ``(n + a) / (t + a / prior)`` over the stretches since the current
    rate began (:func:`regime`), ``a`` = :data:`PRIOR_WEIGHT`; without a prior, ``n / t``."""
    start, _ = regime(parts)
    n, t = sum(f for _, f in parts[start:]), sum(s for s, _ in parts[start:])
    nb, tb = sum(f for _, f in parts[:start]), sum(s for s, _ in parts[:start])
    if prior > 0:
        lam = (n + PRIOR_WEIGHT) / (t + PRIOR_WEIGHT / prior)
    else:
        lam = n / t if t > 0 else 0.0
    return Rate(lam, n, t, nb, tb)


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


__all__ = ["CHANGE_LLR", "CostMeter", "Decision", "PRIOR_WEIGHT", "Rate", "counted", "daly", "decide", "describe",
           "failure_rate", "first_interval", "fits", "regime", "stretches", "unwarned_rate", "young"]
