"""every="auto": the policy's math against hand-computed values, its clamping, the first
interval, the failure-rate estimate, the cost meter, and the policy on a fake clock.

Hand values: Young (1974) ``τ = √(2C/λ)``; Daly (2006, eq. 37) ``τ = √(2CM)·(1 + ⅓√(C/2M)
+ C/18M) − C`` for ``C < 2M``, else ``M``. For C = 10 s, M = 3600 s: √72000 = 268.3282,
x = C/2M = 1/720, √x/3 = 0.0124226, x/9 = 0.00015432, so Daly = 268.3282 · 1.0125769 − 10
= 261.7029 s. For C = 120, M = 1000: √240000 = 489.8979, x = 0.06, factor 1.0883137,
Daly = 533.1639 − 120 = 413.1639 s.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from spotckpt._checkpointer._policies import AutoInterval
from spotckpt._checkpointer._schedule import (
    PRIOR_WEIGHT,
    CostMeter,
    daly,
    decide,
    first_interval,
    fits,
    unwarned_rate,
    young,
)

FAST = settings(max_examples=200, deadline=None, derandomize=True)


def test_young_and_daly_against_hand_values() -> None:
    assert young(10.0, 1 / 3600) == pytest.approx(268.3281573, rel=1e-9)
    assert daly(10.0, 1 / 3600) == pytest.approx(261.7028993, rel=1e-9)
    assert young(120.0, 1 / 1000) == pytest.approx(489.8979486, rel=1e-9)
    assert daly(120.0, 1 / 1000) == pytest.approx(413.1639349, rel=1e-9)
    # C >= 2M: checkpointing costs more than it saves; Daly says save once per M
    assert daly(3000.0, 1 / 1000) == pytest.approx(1000.0)


def test_decide_uses_daly_and_reports_the_expected_loss() -> None:
    d = decide(c=10.0, d=30.0, rate=1 / 3600, grace=120, lo=60, hi=3600)
    assert d.how == "young-daly" and d.interval == pytest.approx(261.7028993, rel=1e-9)
    # first order: overhead C/τ, rework λ(τ/2 + D)
    assert d.overhead == pytest.approx(10 / 261.7028993, rel=1e-9)
    assert d.rework == pytest.approx((261.7028993 / 2 + 30) / 3600, rel=1e-9)
    assert d.fraction == pytest.approx(0.0382112 + 0.0446810, rel=1e-5)
    assert d.to_dict()["fraction_lost"] == pytest.approx(d.fraction, abs=1e-6)


@pytest.mark.parametrize("kw, interval, how", [
    # Young/Daly below min_interval: 60 s
    (dict(c=0.01, d=1.0, rate=1 / 3600, lo=60, hi=3600), 60.0, "min_interval"),
    # above max_interval: an hour
    (dict(c=30.0, d=5.0, rate=1 / (30 * 86400), lo=60, hi=3600), 3600.0, "max_interval"),
    # never shorter than the time to durable (a save cannot protect before it is durable)
    (dict(c=0.01, d=200.0, rate=1 / 3600, lo=60, hi=3600), 200.0, "time to durable"),
    (dict(c=1.0, d=5000.0, rate=1 / 3600, lo=60, hi=3600), 5000.0, "time to durable"),
    # no failure expected at all: the longest interval allowed
    (dict(c=1.0, d=1.0, rate=0.0, lo=60, hi=3600), 3600.0, "max_interval"),
    # before anything is measured: min_interval, 60 s with the defaults (one early save measures C)
    (dict(c=None, d=None, rate=1 / 86400, lo=60, hi=3600), 60.0, "first"),
    (dict(c=None, d=None, rate=1.0, lo=10, hi=1000), 10.0, "first"),
    (dict(c=None, d=30.0, rate=1.0, lo=10, hi=1000), 30.0, "time to durable"),
])
def test_clamping_and_the_first_interval(kw: dict, interval: float, how: str) -> None:
    d = decide(grace=120, **kw)
    assert d.interval == pytest.approx(interval, rel=1e-9) and d.how == how
    assert first_interval(60, 3600) == 60


@FAST
@given(c=st.floats(1e-4, 1e4), rate=st.floats(1e-9, 1e-1), lo=st.floats(1, 1e3), span=st.floats(1, 1e3),
       d=st.none() | st.floats(0, 1e4))
def test_interval_stays_in_bounds_and_follows_its_inputs(c: float, rate: float, lo: float, span: float,
                                                         d: float | None) -> None:
    hi = lo * span
    got = decide(c=c, d=d, rate=rate, grace=120, lo=lo, hi=hi)
    assert lo * (1 - 1e-12) <= got.interval <= max(hi, d or 0.0) * (1 + 1e-12)
    assert got.interval >= (d or 0.0)
    # a higher failure rate never lengthens the interval, a dearer checkpoint never shortens it
    assert decide(c=c, d=d, rate=rate * 2, grace=120, lo=lo, hi=hi).interval <= got.interval * (1 + 1e-9)
    assert decide(c=c * 2, d=d, rate=rate, grace=120, lo=lo, hi=hi).interval >= got.interval * (1 - 1e-9)
    # for C small against 1/λ, Daly's form is Young's
    if c * rate < 1e-6:
        assert daly(c, rate) == pytest.approx(young(c, rate), rel=2e-3)


def test_failure_rate_from_the_history_and_the_prior() -> None:
    ended = {"hard-kill": 2, "notice-late": 1, "notice-saved": 5, "completed": 1}
    t, prior = 10 * 3600.0, 1 / (24 * 3600.0)
    # a notice save fits: only the failures without a usable warning count
    rate, n = unwarned_rate(ended, t, prior, notice_fits=True)
    assert n == 3 and rate == pytest.approx((3 + PRIOR_WEIGHT) / (t + PRIOR_WEIGHT * 24 * 3600))
    # it does not: every preemption counts
    rate, n = unwarned_rate(ended, t, prior, notice_fits=False)
    assert n == 8 and rate == pytest.approx((8 + PRIOR_WEIGHT) / (t + PRIOR_WEIGHT * 24 * 3600))
    # failure_rate=0: the record alone
    assert unwarned_rate(ended, t, 0.0, notice_fits=True) == (pytest.approx(3 / t), 3)
    assert unwarned_rate({}, 0.0, 0.0, notice_fits=True) == (0.0, 0)
    # nothing recorded yet: the prior
    assert unwarned_rate({}, 0.0, prior, notice_fits=True)[0] == pytest.approx(prior)


def test_whether_a_notice_save_fits_the_grace() -> None:
    # as the flush planner plans it: D x 1.25 + 0.5 s, against the grace less 1.5 s of exit margin
    assert fits(None, 120) is None
    assert fits(10.0, 120) is True
    assert fits(94.5, 120) is False and fits(94.0, 120) is True  # 118.625 and 118.0 against 118.5
    assert fits(22.0, 30) is True and fits(22.5, 30) is False


def test_cost_meter_against_hand_values() -> None:
    m = CostMeter(smoothing=0.5, warmup=0)
    for _ in range(3):
        m.step(1.0)                 # baseline 1.0 s per step outside a save's window
    m.saved(0.2, at=100.0)          # the training thread stalled 0.2 s
    m.step(1.5)                     # slowed down by the background write: +0.5
    m.step(1.3)                     # +0.3
    m.durable(at=103.0)
    m.step(1.0)                     # the window closes at this boundary: +0.0
    assert m.samples == 1 and m.c == pytest.approx(1.0) and m.d == pytest.approx(3.0)
    m.step(1.0)
    m.saved(0.4, at=200.0)
    m.durable(at=201.0)
    m.step(0.9)                     # faster than the baseline: the excess is clamped at 0 per save
    assert m.c == pytest.approx((1.0 + 0.4) / 2) and m.d == pytest.approx(2.0)


@FAST
@given(base=st.floats(0.01, 10), stall=st.floats(0, 5), extra=st.floats(0, 2), n=st.integers(1, 5),
       saves=st.integers(1, 6))
def test_cost_meter_finds_stall_plus_slowdown(base: float, stall: float, extra: float, n: int, saves: int) -> None:
    m, t = CostMeter(warmup=0), 0.0
    m.step(base)
    for _ in range(saves):
        m.saved(stall, at=t)
        for i in range(n):
            if i == n - 1:
                m.durable(at=t + 7.0)
            m.step(base + extra)
        for _ in range(2):
            m.step(base)
        t += 100.0
    assert m.samples == saves
    assert m.c == pytest.approx(stall + n * extra, rel=1e-6, abs=1e-9)
    assert m.d == pytest.approx(7.0)


def test_the_first_save_of_a_process_is_not_a_sample() -> None:
    """It copies into fresh buffers and starts the writer: measured 0.44 s against 0.03-0.1 s
    for the next ones (bench/schedule.py), and a first interval chosen from it lost an hour."""
    m = CostMeter()
    m.step(1.0)
    m.saved(5.0, at=0.0, step=10)     # cold: 5 s
    m.durable(at=9.0, step=10)
    m.step(1.0)
    assert m.c is None and m.samples == 0 and not m.in_window
    m.saved(0.1, at=20.0, step=20)
    m.durable(at=19.0, step=10)        # a late callback of an older step does not close this one
    m.step(1.0)
    assert m.in_window
    m.durable(at=22.0, step=30)        # a newer step durable: this one is too
    m.step(1.0)
    assert m.samples == 1 and m.c == pytest.approx(0.1) and m.d == pytest.approx(2.0)


def test_saves_faster_than_they_become_durable_still_measure_d() -> None:
    """A first interval shorter than the time to durable: each save still gets its own D, so
    the interval can grow to it (a new save used to drop the old window unmeasured)."""
    m = CostMeter(warmup=0, smoothing=1.0)
    m.step(1.0)
    for k in range(1, 6):           # a save every 2 s, each durable 5 s after its start
        m.saved(0.1, at=2.0 * k, step=k)
        m.step(1.0)
        m.durable(at=2.0 * k + 5.0 - 2.0, step=k - 1) if k > 1 else None
        m.step(1.0)
    assert m.samples >= 3 and m.d == pytest.approx(5.0) and m.c == pytest.approx(0.1)
    d = decide(c=m.c, d=m.d, rate=1 / 60, grace=120, lo=1.0, hi=3600)
    assert d.interval >= m.d


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_auto_interval_policy_on_a_fake_clock() -> None:
    clock, made, seen = _Clock(), [], []
    c: list[float | None] = [None]

    def choose():
        made.append(clock.t)
        return decide(c=c[0], d=1.0, rate=1 / 3600, grace=120, lo=60, hi=3600)
    p = AutoInterval(choose, clock=clock, recheck=30.0, on_change=seen.append)
    assert p.interval == 60.0 and seen[-1].how == "first"
    clock.t = 59.9
    assert not p.due(1)
    clock.t = 60.0
    assert p.due(2)
    c[0] = 10.0                      # the first save measured C
    p.saved(2)
    assert p.interval == pytest.approx(261.7028993) and made[-1] == 60.0
    clock.t = 60.0 + 261.0
    assert not p.due(3)
    clock.t = 60.0 + 262.0
    assert p.due(4)
    # re-evaluated every `recheck` seconds while no save happens (the estimates move)
    n, last = len(made), made[-1]
    clock.t = last + 29.0
    p.due(5)
    assert len(made) == n
    clock.t = last + 30.0
    p.due(6)
    assert len(made) == n + 1 and len(seen) == len(made)
    assert math.isfinite(p.interval)
