"""``spotckpt spot`` replays interruption traces: a file of times with or without notice,
Poisson processes, the AWS Spot Instance Advisor's frequency bands; bad values are one line
and exit status 2; the report shows every="auto"'s decision per incarnation and how each
incarnation ended as the job itself recorded it; ``spotckpt status`` explains the choice."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import REPO, run_env
from hypothesis import given, settings, strategies as st
from proc_helpers import PY, run, spotckpt

from spotckpt._spot import _traces

SCRIPT = REPO / "tests" / "scripts" / "auto_train.py"


def test_a_trace_file_with_and_without_notice(tmp_path: Path) -> None:
    f = tmp_path / "trace.txt"
    f.write_text("# seconds of training, then the kind\n120 notice\n\n60\n300 kill  # a host lost\n30,hard-kill\n")
    pts = _traces.read_trace(f)
    assert [(p.at, p.notice) for p in pts] == [(30.0, False), (60.0, True), (120.0, True), (300.0, False)]
    assert [p.at for p in _traces.read_trace(f, scale=60)] == [0.5, 1.0, 2.0, 5.0]


@pytest.mark.parametrize("text, needle", [
    ("12 maybe\n", "'maybe': use 'notice'"),
    ("soon\n", "'soon' is not a number of seconds"),
    ("-4 kill\n", "'-4' is not a number of seconds"),
    ("1 2 3\n", "expected '<seconds> [notice|kill]'"),
    ("nan\n", "'nan' is not a number"),
])
def test_a_bad_trace_is_one_line_and_exit_2(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "trace.txt"
    f.write_text("10 notice\n" + text)
    r = run(spotckpt("spot", "--workdir", str(tmp_path / "wd"), "--interrupt-trace", str(f), "--", "true"),
            env=run_env())
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and needle in line and f"{f}:2" in line, line


@pytest.mark.parametrize("opts, needle", [
    (["--interrupt-trace", "/no/such/trace"], "--interrupt-trace /no/such/trace"),
    (["--no-notice", "1.5", "--interrupt-rate", "2"], "argument --no-notice: '1.5': must be a finite number >= 0 and <= 1"),
    (["--no-notice", "0.5"], "--no-notice applies to --interrupt-rate and --advisor-band"),
    (["--time-scale", "0"], "argument --time-scale: '0': must be a finite number > 0"),
    (["--time-scale", "60"], "--time-scale scales --interrupt-trace and --advisor-band"),
    (["--kill-rate", "-1"], "argument --kill-rate: '-1': must be a finite number >= 0"),
    (["--kill-at", "later"], "argument --kill-at: 'later' is not a number of seconds"),
    (["--advisor-band", "30%"], "--advisor-band: invalid choice"),
])
def test_bad_trace_options_are_one_line_and_exit_2(tmp_path: Path, opts: list[str], needle: str) -> None:
    r = run(spotckpt("spot", "--workdir", str(tmp_path / "wd"), *opts, "--", "true"), env=run_env())
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), band=st.sampled_from(_traces.BAND_CHOICES))
def test_advisor_bands_draw_a_rate_inside_the_band(seed: int, band: str) -> None:
    got, per_month = _traces.advisor_rate(band, random.Random(seed))
    lo, hi = _traces.ADVISOR_BANDS[got]
    assert band in (got, "mixed")
    assert -math.log(1 - lo) <= per_month <= -math.log(1 - hi)
    # a month of running stands for 1 / scale of it: the same points, compressed
    a = _traces.advisor(band, 3600.0, random.Random(seed), scale=_traces.MONTH / 3600.0)
    assert all(0 < p.at < 3600.0 and p.notice for p in a) and a == sorted(a)


def test_the_random_sources_are_seeded_and_mixed_in_order() -> None:
    kw = dict(at=[5.0], kill_at=[7.0], rate=30.0, kill_rate=30.0, horizon=3600.0, no_notice=0.5)
    a = _traces.schedule(seed=3, **kw)
    assert a == _traces.schedule(seed=3, **kw) and a != _traces.schedule(seed=4, **kw)
    assert a == sorted(a) and all(0 <= p.at < 3600 for p in a)
    kinds = {(p.source, p.notice) for p in a}
    assert {("interrupt-at", True), ("kill-at", False), ("kill-rate", False)} <= kinds
    assert ("interrupt-rate", True) in kinds and ("interrupt-rate", False) in kinds  # half without notice
    # the old --interrupt-rate draws are unchanged for a seed
    old = _traces.schedule(at=[], kill_at=[], rate=60.0, kill_rate=0.0, seed=7, horizon=3600.0)
    from spotckpt._spot._spot import interruption_schedule
    assert [(p.at, p.source) for p in old] == interruption_schedule([], 60.0, 7, 3600.0)


@pytest.mark.slow
def test_emulated_job_reports_the_schedule_per_incarnation_and_status_explains_it(tmp_path: Path) -> None:
    """A kill without warning, then a spot interruption with notice, then the end: the job's
    history says hard-kill, notice-saved, completed; each incarnation's decision is in the
    report; the second start knows about the kill (its failure rate is higher)."""
    trace = tmp_path / "trace.txt"
    trace.write_text("60 kill\n180 notice\n")     # seconds of training at --time-scale 60: 1 s, 3 s
    wd = tmp_path / "wd"
    env = run_env(AUTO_STEPS="120", AUTO_STEP_S="0.05", AUTO_MIN="0.2", AUTO_MAX="2", AUTO_STATE_MB="2",
                  SPOTCKPT_METADATA="off")
    r = run(spotckpt("spot", "--json", "--workdir", str(wd), "--grace", "20", "--capacity-wait", "0",
                     "--interrupt-trace", str(trace), "--time-scale", "60", "--max-run", "300",
                     "--", PY, str(SCRIPT)), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["TrainingJobStatus"] == "Completed"
    assert [(i["Source"], i["Notice"]) for i in rep["Interruptions"]] == [("trace", False), ("trace", True)]
    attempts = rep["Attempts"]
    assert [a.get("RecordedEnding") for a in attempts] == ["hard-kill", "notice-saved", "completed"], attempts
    assert [a.get("Generation") for a in attempts] == [1, 2, 3]
    for a in attempts:
        s = a["Schedule"]
        assert 0.2 <= s["interval_s"] <= 2.0 + (s["d_s"] or 0) and s["rate_per_hour"] > 0, s
        assert {"c", "d", "rate", "grace", "notice", "interval"} <= set(s["sources"]), s  # where each came from
    assert attempts[1]["Schedule"]["rate_per_hour"] > attempts[0]["Schedule"]["rate_per_hour"]  # learned the kill
    assert rep["RecordedHistory"]["Ended"] == {"hard-kill": 1, "notice-saved": 1, "completed": 1}
    assert "Attempt 2: every='auto' chose" in r.stderr and "(recorded end: notice-saved)" in r.stderr
    # status, from the remote and the last instance's state dir
    st_ = run(spotckpt("status", "--json", "--local-dir", str(wd / "checkpoints"), "--remote",
                       f"file://{wd / 'remote'}/"), env=run_env())
    assert st_.returncode == 0, st_.stderr
    doc = json.loads(st_.stdout)
    sched, hist = doc["schedule"], doc["history"]
    assert sched["interval_s"] > 0 and sched["c_s"] is not None and sched["fraction_lost"] is not None
    assert set(sched["sources"]) >= {"c", "d", "rate", "grace", "notice", "interval"}
    assert "1 failure(s) without usable warning" in sched["sources"]["rate"]
    assert hist["ended"] == {"hard-kill": 1, "notice-saved": 1, "completed": 1}
    text = run(spotckpt("status", "--local-dir", str(wd / "checkpoints"), "--remote", f"file://{wd / 'remote'}/"),
               env=run_env()).stdout
    assert "checkpoint schedule:  every " in text and "λ:" in text and "restarts:             2 (3 start(s)" in text
