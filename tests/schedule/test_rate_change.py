"""every="auto": the failure rate follows a change (a burst that stopped stops costing, a
burst that starts counts at once), stays the whole history's when the rate did not change,
and the default max_interval lets Young/Daly reach its optimum when failures are rare.

Hand values for the burst: 5 kills in the first 100 min (20 min apart), then 10 h of quiet
running. One rate over all: 5 / 700 min; split after the 5th kill: 5 / 100 min and 0 / 600
min; log-likelihood ratio 5·ln(5/100) − 5·ln(5/700) = 5·ln 7 = 9.73 > 8 + ln 5 = 9.61 (5
splits tried): a change. λ then counts the 600 min alone: (0 + ¼) / (600 min + ¼ · 2 h).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from spotckpt._cadence import DEFAULT_MAX_INTERVAL, Schedule
from spotckpt._checkpointer._autosave import _Auto
from spotckpt._checkpointer._schedule import PRIOR_WEIGHT, failure_rate, regime, stretches
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


def test_a_burst_that_stopped_stops_counting(tmp_path: Path) -> None:
    dec = _decide(tmp_path, _burst_then_quiet(), ran=10 * H)
    quiet = (0 + PRIOR_WEIGHT) / (10 * H + PRIOR_WEIGHT / PRIOR)
    whole = (5 + PRIOR_WEIGHT) / (100 * 60 + 10 * H + PRIOR_WEIGHT / PRIOR)
    # the old estimate (every failure over the whole running time) was 19x this one and kept
    # saving every ~9 min through the quiet hours; now the interval grows with the quiet
    assert dec.rate == pytest.approx(quiet, rel=1e-9) and dec.rate < whole / 10
    assert dec.interval > 2.5 * math.sqrt(2 * 18.8 / whole)
    assert "rate changed after 5" in dec.sources["rate"]


def test_the_change_is_seen_only_once_the_quiet_says_so(tmp_path: Path) -> None:
    # 30 min after the 5th kill nothing says the burst is over: the whole history counts
    dec = _decide(tmp_path, _burst_then_quiet(), ran=30 * 60.0)
    assert dec.rate == pytest.approx((5 + PRIOR_WEIGHT) / (130 * 60 + PRIOR_WEIGHT / PRIOR), rel=1e-9)
    assert "rate changed" not in dec.sources["rate"]


def test_a_burst_after_a_long_quiet_stretch_counts_at_once() -> None:
    # 200 h without a failure, then 4 kills 10 min apart: the quiet does not dilute them
    parts = [(200 * H, 1)] + [(600.0, 1)] * 4 + [(60.0, 0)]
    got = failure_rate(parts, PRIOR)
    assert (got.n, got.t) == (4, 2460.0) and got.n_before == 1
    assert got.rate == pytest.approx((4 + PRIOR_WEIGHT) / (2460 + PRIOR_WEIGHT / PRIOR))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rate_h=st.floats(0.02, 3.0), n=st.integers(2, 30), seed=st.integers(0, 10**6))
def test_no_change_is_found_in_an_even_history(rate_h: float, n: int, seed: int) -> None:
    # failures evenly spaced (each gap within ±40% of the mean): one rate, the whole history
    rng = random.Random(seed)
    parts = [(rng.uniform(0.6, 1.4) / rate_h * H, 1) for _ in range(n)] + [(rng.uniform(0, 1) / rate_h * H, 0)]
    assert regime(parts) == (0, 0.0)
    got = failure_rate(parts, PRIOR)
    assert got.n == n and got.t == pytest.approx(sum(s for s, _ in parts))


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
    dec = _decide(tmp_path, summ, ran=60.0)
    assert dec.how == "young-daly" and 1.1 * H < dec.interval < DEFAULT_MAX_INTERVAL == 2 * H
    # and no failure at all for weeks: the bound, two hours
    dec = _decide(tmp_path, {"incarnations": 0, "run_s": 0.0, "ended": {}, "runs": []}, ran=500 * H)
    assert dec.how == "max_interval" and dec.interval == 2 * H
