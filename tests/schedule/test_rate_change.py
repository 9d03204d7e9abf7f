"""every="auto": the failure rate follows a change (a burst that stopped stops costing, a
burst that starts counts at once), stays the whole history's when the rate did not change,
and the default max_interval lets Young/Daly reach its optimum when failures are rare.

The model (``spotckpt/_checkpointer/_rate.py``): within a regime failures are Poisson with a
Gamma(a, b) prior (a = ¼, b = a / r0, r0 the prior rate); at each restart after a failure
the rate may change with probability h = 0.02. Hand values for two stretches, 1 h ended by
a failure, then 10 h of quiet running (in hours; r0 = 1/2 h, so b = 0.5): the marginal
likelihood of n failures in t is ``b^a Γ(a+n) / (Γ(a) (b+t)^(a+n))`` (the ``t^n/n!`` every
hypothesis shares left out), so the odds of "a new rate began at the restart" against "one
rate over all" are

    h/(1−h) · (b/(b+10))^a · ((b+11)/(b+1))^(a+1)
      = 0.0204082 · 0.4671380 · 12.757284 = 0.1216207,

weights 0.8915670 (one rate) and 0.1084330 (a new one), and λ the posterior mean
0.8915670 · 1.25/11.5 + 0.1084330 · 0.25/10.5 = 0.0969130 + 0.0025818 = 0.0994912 per hour.
"""
from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from spotckpt._cadence import DEFAULT_MAX_INTERVAL, Schedule
from spotckpt._checkpointer._autosave import _Auto
from spotckpt._checkpointer._rate import CHANGE_PRIOR, PRIOR_WEIGHT, failure_rate, regimes, stretches
from spotckpt._remote import _history

H = 3600.0
PRIOR = 1 / (2 * H)   # the default prior: one failure without warning per 2 h


def _decide(tmp_path: Path, summ: dict, *, ran: float, c: float = 18.8, d: float = 5.0):
    """The Checkpointer's own decision (``_Auto.decide``) for a history summary, ``ran``
    seconds into this incarnation, with C and D measured."""
    t = [0.0]
    a = _Auto(Schedule(), clock=lambda: t[0], grace=120.0, grace_source="test", state_dir=tmp_path,
              shared_state=tmp_path)
    a.local_copy = {"summary": summ}
    a.meter.c, a.meter.d, a.meter.samples = c, d, 3
    t[0] = ran
    return a.decide()


def _burst_then_quiet() -> dict:
    """The history a supervisor leaves after 5 kills 20 min apart (each incarnation ran 20
    min), read 10 h into the 6th incarnation."""
    runs = [[20 * 60.0, "hard-kill"] for _ in range(5)]
    return {"incarnations": 5, "run_s": 100 * 60.0, "ended": {"hard-kill": 5}, "runs": runs}


def _whole(parts: list[tuple[float, int]]) -> float:
    """One rate over the whole history, with the prior."""
    n, t = sum(f for _, f in parts), sum(s for s, _ in parts)
    return (n + PRIOR_WEIGHT) / (t + PRIOR_WEIGHT / PRIOR)


def _every_change_point_set(parts: list[tuple[float, int]], prior: float, h: float) -> float:
    """λ by brute force, independent of the recursion: every set of restarts where the rate
    may have changed (those right after a failure), its prior ``h^k (1−h)^(m−k)``, the
    marginal likelihood of each regime, and the posterior mean of the last regime's rate."""
    a, b = PRIOR_WEIGHT, PRIOR_WEIGHT / prior
    allowed = [k for k in range(1, len(parts)) if parts[k - 1][1] > 0]

    def log_m(n: int, t: float) -> float:
        return a * math.log(b) + math.lgamma(a + n) - math.lgamma(a) - (a + n) * math.log(b + t)
    num = den = 0.0
    for k in range(len(allowed) + 1):
        for cuts in itertools.combinations(allowed, k):
            bounds = [0, *cuts, len(parts)]
            segs = [(sum(f for _, f in parts[i:j]), sum(s for s, _ in parts[i:j])) for i, j in zip(bounds, bounds[1:])]
            w = math.exp(k * math.log(h) + (len(allowed) - k) * math.log1p(-h) + sum(log_m(n, t) for n, t in segs))
            num += w * (a + segs[-1][0]) / (b + segs[-1][1])
            den += w
    return num / den


def test_two_stretches_against_hand_values() -> None:
    parts = [(1 * H, 1), (10 * H, 0)]
    assert CHANGE_PRIOR == 0.02
    (w0, j0, n0, t0), (w1, j1, n1, t1) = regimes(parts, PRIOR)
    assert (j0, n0, t0, j1, n1, t1) == (0, 1, 11 * H, 1, 0, 10 * H)
    assert w0 == pytest.approx(0.8915670, rel=1e-6) and w1 == pytest.approx(0.1084330, rel=1e-6)
    got = failure_rate(parts, PRIOR)
    assert got.rate * H == pytest.approx(0.0994912, rel=1e-6)
    # the most probable regime is the whole history: nothing to say about a change
    assert (got.n, got.t, got.n_before, got.t_before) == (1, 11 * H, 0, 0.0)
    # the restart after a completed notice save (no failure) is no candidate: one regime
    assert [j for _, j, *_ in regimes([(1 * H, 0), (10 * H, 0)], PRIOR)] == [0]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(parts=st.lists(st.tuples(st.floats(0.0, 400 * H), st.integers(0, 1) | st.integers(0, 6)), min_size=1,
                      max_size=9), ran=st.floats(0.0, 400 * H), prior_h=st.floats(0.001, 5.0),
       h=st.sampled_from([CHANGE_PRIOR, 0.001, 0.3]))
def test_the_recursion_is_the_posterior_over_every_set_of_changes(parts: list, ran: float, prior_h: float,
                                                                  h: float) -> None:
    parts = [p for p in parts if p[0] > 0 or p[1] > 0] + [(ran, 0)]
    prior = prior_h / H
    want = _every_change_point_set(parts, prior, h)
    got = sum(w * (PRIOR_WEIGHT + n) / (PRIOR_WEIGHT / prior + t) for w, _, n, t in regimes(parts, prior, h=h))
    assert got == pytest.approx(want, rel=1e-9)
    if h == CHANGE_PRIOR:
        assert failure_rate(parts, prior).rate == pytest.approx(want, rel=1e-9)
    assert sum(w for w, *_ in regimes(parts, prior, h=h)) == pytest.approx(1.0, rel=1e-12)


def test_a_burst_that_stopped_stops_counting(tmp_path: Path) -> None:
    # the benchmark's miss ("5 kills in the first 2 hours, then 2 notices", 1.11x the best fixed
    # interval emulated): the thresholded change-point test saw the change ~10 h into the quiet
    # and saved every 7-9 minutes until then. Now the quiet counts as soon as it says so.
    summ = _burst_then_quiet()
    parts = stretches(summ, 5 * H, notice_fits=True)
    dec = _decide(tmp_path, summ, ran=5 * H, c=32.3, d=153.0)
    assert dec.rate < _whole(parts) / 3                         # was the whole history's: 1 per 1.4 h
    assert dec.interval > 15 * 60                               # was 9.0 min
    assert "rate most likely changed there" in dec.sources["rate"] and "after 5 in the 1.67 h before" in \
        dec.sources["rate"]
    # and the longer the quiet, the closer λ gets to the quiet's own (the burst fades, it is never cut)
    quiet = (0 + PRIOR_WEIGHT) / (10 * H + PRIOR_WEIGHT / PRIOR)
    assert 1.0 < _decide(tmp_path, summ, ran=10 * H).rate / quiet < 1.5


def test_the_change_is_seen_only_once_the_quiet_says_so(tmp_path: Path) -> None:
    # 30 min after the 5th kill nothing says the burst is over: about the whole history's rate
    summ = _burst_then_quiet()
    dec = _decide(tmp_path, summ, ran=30 * 60.0)
    assert dec.rate == pytest.approx(_whole(stretches(summ, 30 * 60.0, notice_fits=True)), rel=0.05)
    assert "rate most likely changed" not in dec.sources["rate"]


def test_a_burst_after_a_long_quiet_stretch_counts_at_once() -> None:
    # 200 h without a failure, then 4 kills 10 min apart: the quiet does not dilute them
    parts = [(200 * H, 1)] + [(600.0, 1)] * 4 + [(60.0, 0)]
    got = failure_rate(parts, PRIOR)
    assert (got.n, got.t, got.n_before) == (4, 2460.0, 1) and got.weight > 0.95
    assert got.rate == pytest.approx((4 + PRIOR_WEIGHT) / (2460 + PRIOR_WEIGHT / PRIOR), rel=0.05)
    assert got.rate > 100 * _whole(parts)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rate_h=st.floats(0.02, 3.0), n=st.integers(2, 30), seed=st.integers(0, 10**6))
def test_an_even_history_keeps_one_rate(rate_h: float, n: int, seed: int) -> None:
    # failures evenly spaced (each gap within ±40% of the mean): one rate over the whole
    # history is the most probable by far, and λ stays near it (what moves it: the 2% chance
    # of a new rate at the last restart, whose prior is higher than these rates)
    rng = random.Random(seed)
    parts = [(rng.uniform(0.6, 1.4) / rate_h * H, 1) for _ in range(n)] + [(rng.uniform(0, 1) / rate_h * H, 0)]
    assert max(regimes(parts, PRIOR))[1] == 0 and regimes(parts, PRIOR)[0][0] > 0.8
    got = failure_rate(parts, PRIOR)
    assert (got.n, got.n_before) == (n, 0) and got.t == pytest.approx(sum(s for s, _ in parts))
    assert got.rate == pytest.approx(_whole(parts), rel=0.15)


def test_stretches_from_the_history_summary() -> None:
    doc = _history.empty()
    for g, how in enumerate(["hard-kill"] * 3 + ["notice-saved", "completed"], 1):
        _history.begin_doc(doc, g, now=float(g))
        rec = doc["incarnations"][-1]
        rec["run_s"], rec["ended"] = 600.0 * g, how
        _history._fold(doc, rec)
    _history.begin_doc(doc, 9, now=9.0)
    summ = _history.summary(doc, exclude=9)
    assert summ["runs"] == [[600.0, "hard-kill"], [1200.0, "hard-kill"], [1800.0, "hard-kill"],
                            [2400.0, "notice-saved"], [3000.0, "completed"]]
    assert stretches(summ, 50.0, notice_fits=True) == [(600.0, 1), (1200.0, 1), (1800.0, 1), (2400.0, 0),
                                                       (3000.0, 0), (50.0, 0)]
    # a notice save that does not fit the grace counts as a failure
    assert stretches(summ, 0.0, notice_fits=False)[3] == (2400.0, 1)
    # incarnations no longer listed live on in the totals: one stretch before the listed ones
    old = dict(summ, run_s=summ["run_s"] + 7200.0, ended={"hard-kill": 5, "notice-saved": 1, "completed": 1})
    assert stretches(old, 0.0, notice_fits=True)[0] == (7200.0, 2)
    # an older version's summary (no runs): the totals as one stretch
    assert stretches({"run_s": 100.0, "ended": {"hard-kill": 2}}, 5.0, notice_fits=True) == [(100.0, 2), (5.0, 0)]


def test_rare_failures_reach_young_daly_beyond_an_hour(tmp_path: Path) -> None:
    # 2 failures in 300 h of a month-long job, C = 18.8 s: Young/Daly says ~1.2 h; the old
    # default max_interval (1 h) clamped it to what a fixed 60 min does
    summ = {"incarnations": 2, "run_s": 300 * H, "ended": {"hard-kill": 2},
            "runs": [[150 * H, "hard-kill"], [150 * H, "hard-kill"]]}
    dec = _decide(tmp_path, summ, ran=6 * H)
    assert dec.how == "young-daly" and 1.1 * H < dec.interval < DEFAULT_MAX_INTERVAL == 2 * H
    # right after the restart the rate may have changed (2%) to what the prior says until the
    # new instance's own record says more: shorter for an hour or two, never below the prior's
    fresh = _decide(tmp_path, summ, ran=60.0)
    assert 0.5 * H < fresh.interval < dec.interval and _decide(tmp_path, summ, ran=2 * H).interval > H
    # and no failure at all for weeks: the bound, two hours
    dec = _decide(tmp_path, {"incarnations": 0, "run_s": 0.0, "ended": {}, "runs": []}, ran=500 * H)
    assert dec.how == "max_interval" and dec.interval == 2 * H
