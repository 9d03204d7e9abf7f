"""every="auto" on the benchmark's own traces, in the replay (``bench/schedule_replay.py``:
the policy code itself on a virtual clock, with the costs the emulated runs measured),
against the fixed intervals of 1, 5, 15 and 60 minutes on the same trace.

Two figures per policy: the time lost as the trace's failures fell (what BENCHMARKS.md
shows), and the time lost *expected* over where each failure falls in the interval in force
(half of it, plus the time to durable, instead of what that failure happened to cost). The
phase of a failure against the saves is luck no policy chooses: with 8 failures in a month
it decides whether auto or the fixed hour wins a trace by 20% either way (the 1.24x of the
15-20% band on the benchmark's draw is 1.02x expected). The expected figure is what a
change of the policy's design moves; the tests hold it.
"""
from __future__ import annotations

import sys
from typing import Any

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from schedule import EMULATED, GRACE, JOB_HOURS, MONTH_DAYS, POLICIES, REPLAYED, SCALE, STEP_S, points  # noqa: E402
from schedule_replay import Costs, replay  # noqa: E402

# what the emulated runs of bench/results-schedule.json measured (training seconds), pinned
# so that the lead's next run of the benchmark does not move these tests
COSTS = Costs(c=32.28, d=153.168, restart=1015.58, notice=401.64, restart_child=522.13, write=55.668)


def _trace(name: str) -> tuple[dict[str, Any], float, float, float]:
    for tr in EMULATED:
        if tr["name"] == name:
            return tr, JOB_HOURS * 3600.0, STEP_S * SCALE, GRACE * SCALE
    for tr in REPLAYED:
        if tr["name"] == name:
            return tr, MONTH_DAYS * 86400.0, 60.0, 120.0
    raise KeyError(name)


def _ratios(name: str, timeline: list | None = None) -> tuple[float, float]:
    """auto's lost time over the best fixed interval's on trace ``name``: as the failures
    fell, and expected over where each falls."""
    tr, job_s, step_s, grace = _trace(name)
    pts = points(tr, (4 if job_s < 86400 else 2) * job_s)
    got = {p: replay(pts, p, COSTS, job_s, step_s=step_s, grace=grace, timeline=timeline if p == "auto" else None)
           for p in POLICIES}
    fixed = [got[p] for p in POLICIES if p != "auto"]
    return (got["auto"]["lost_s"] / min(r["lost_s"] for r in fixed),
            got["auto"]["lost_mean_s"] / min(r["lost_mean_s"] for r in fixed))


def test_after_a_burst_the_interval_grows_as_soon_as_the_quiet_says_so() -> None:
    # the benchmark's trace file: 5 kills in the first 100 minutes, then quiet (two notices).
    # The thresholded change-point test kept every 4-6 minutes for 5 quiet hours and lost
    # 1.05x the best fixed interval expected (1.11x emulated); the posterior over where the
    # current rate began lets the quiet count as it accumulates.
    tl: list = []
    fell, expected = _ratios("burst", tl)
    at_4h = [detail for at, what, detail in tl if what == "interval" and at <= 4 * 3600.0][-1]
    assert float(at_4h.split(" min")[0]) >= 10.0, at_4h                # was 6.1 min
    assert expected <= 1.03 and fell <= 1.1, (fell, expected)          # expected was 1.051


@pytest.mark.parametrize("name, bound", [
    ("kills-0.5/h", 1.05),   # 1.10x emulated on the benchmark's run: 1.01x expected, 1.00x as it fell here
    ("kills-2/h", 1.05),
    ("mixed-2/h", 1.05),
])
def test_the_twelve_hour_traces_expected(name: str, bound: float) -> None:
    fell, expected = _ratios(name)
    assert expected <= bound, (fell, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"advisor {b}" for b in (">20%", "15-20%", "10-15%")] + ["advisor mixed x16"])
def test_a_month_of_spot_interruptions_expected(name: str) -> None:
    # "15-20%": 8 interruptions after 232 quiet hours; where they fell against the saves made
    # auto lose 1.24x the fixed hour on the benchmark's draw, 1.02x expected
    fell, expected = _ratios(name)
    assert expected <= 1.03, (fell, expected)
