"""every="auto" settings: refused at construction with one line naming the setting,
SPOTCKPT_EVERY=auto, the first interval a Checkpointer starts with, and C measured from the
step boundaries the Checkpointer sees (a fake clock, no sleeping)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import spotckpt
from spotckpt._cadence import resolve_schedule
from spotckpt._checkpointer._policies import AutoInterval, EverySteps


@pytest.mark.parametrize("kw, words", [
    (dict(every="auto", every_steps=500), ["every='auto'", "every_steps"]),
    (dict(every="auto", every_seconds=60), ["every='auto'", "every_seconds"]),
    (dict(every="auto", every_steps=5, every_seconds=6), ["every_steps and every_seconds"]),
    (dict(every="often"), ["every='often'", "'auto'"]),
    (dict(every=5), ["every=5"]),
    (dict(every="auto", failure_rate=-0.5), ["failure_rate=-0.5", ">= 0"]),
    (dict(every="auto", failure_rate=float("nan")), ["failure_rate=nan"]),
    (dict(every="auto", failure_rate="lots"), ["failure_rate='lots'"]),
    (dict(every="auto", mtbf=0), ["mtbf=0", "> 0"]),
    (dict(every="auto", mtbf=-3), ["mtbf=-3"]),
    (dict(every="auto", mtbf=12, failure_rate=0.1), ["failure_rate and mtbf"]),
    (dict(every="auto", min_interval=600, max_interval=60), ["min_interval=600", "max_interval=60"]),
    (dict(every="auto", min_interval=9000), ["min_interval=9000", "max_interval=7200 s (the default)"]),
    (dict(every="auto", min_interval=-1), ["min_interval=-1"]),
    (dict(every="auto", max_interval=float("inf")), ["max_interval=inf"]),
    (dict(failure_rate=0.2), ["failure_rate=", "every='auto'"]),
    (dict(every_steps=10, max_interval=60), ["max_interval=", "every='auto'"]),
])
def test_bad_settings_are_refused_at_construction(tmp_path: Path, kw: dict, words: list[str]) -> None:
    with pytest.raises(spotckpt.ConfigError) as ei:
        spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path / "ck", remote=None, **kw)  # no open(), no `with`
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError) and "\n" not in msg and msg.startswith("spotckpt:"), msg
    for w in words:
        assert w in msg, (w, msg)
    assert not (tmp_path / "ck").exists()  # nothing was touched


@pytest.mark.parametrize("env, words", [
    ({"SPOTCKPT_EVERY": "auto", "SPOTCKPT_EVERY_STEPS": "5"}, ["SPOTCKPT_EVERY", "SPOTCKPT_EVERY_STEPS"]),
    ({"SPOTCKPT_EVERY": "hourly"}, ["every='hourly'", "SPOTCKPT_EVERY"]),
    ({"SPOTCKPT_EVERY": "auto", "SPOTCKPT_FAILURE_RATE": "-1"}, ["SPOTCKPT_FAILURE_RATE=", ">= 0"]),
    ({"SPOTCKPT_EVERY": "auto", "SPOTCKPT_MIN_INTERVAL": "90", "SPOTCKPT_MAX_INTERVAL": "30"},
     ["SPOTCKPT_MIN_INTERVAL=90", "SPOTCKPT_MAX_INTERVAL=30"]),
])
def test_bad_variables_are_refused_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   env: dict, words: list[str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(spotckpt.ConfigError) as ei:
        spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path / "ck", remote=None)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_arguments_win_over_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTCKPT_EVERY", "auto")
    assert resolve_schedule(every_steps=500) is None  # a fixed cadence given: the variable is not read
    monkeypatch.setenv("SPOTCKPT_EVERY_STEPS", "7")
    s = resolve_schedule(every="auto", mtbf=6)  # auto given: SPOTCKPT_EVERY_STEPS is not read
    assert s is not None and s.failure_rate == pytest.approx(1 / (6 * 3600)) and s.source == "mtbf=6 h"
    monkeypatch.setenv("SPOTCKPT_MTBF", "2")
    monkeypatch.delenv("SPOTCKPT_EVERY_STEPS")
    s = resolve_schedule()
    assert s is not None and s.source == "SPOTCKPT_MTBF=2 h" and s.min_interval == 60 and s.max_interval == 7200


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _events(ckpt: spotckpt.Checkpointer, kind: str) -> list[dict]:
    path = ckpt._local.meta / "events.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def test_spotckpt_every_auto_and_the_first_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTCKPT_EVERY", "auto")
    clock = _Clock()
    with spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path / "ck", remote=None, clock=clock) as ckpt:
        assert isinstance(ckpt._policy, AutoInterval)
        assert ckpt._policy.interval == 60.0   # min_interval, stated in the docs: one early save measures C
        (first,) = _events(ckpt, "schedule")
        assert first["how"] == "first" and "min_interval = 60 s" in first["sources"]["interval"]
        decision = json.loads((ckpt._local.meta / "schedule.json").read_text())
        assert decision["interval_s"] == 60.0 and decision["c_s"] is None
        for step in ckpt.steps(total=4):
            clock.t += 25.0                       # 25 s per step: the first save after 3 steps (75 s)
        assert ckpt._last_saved == 4
    saved = [e["step"] for e in _events(ckpt, "saved")]
    assert saved == [3, 4]   # then the end of the loop
    with spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path / "ck2", remote=None, every_steps=3) as ckpt:
        assert isinstance(ckpt._policy, EverySteps)  # the argument wins over SPOTCKPT_EVERY


def test_cost_is_measured_from_step_times_inside_and_outside_the_save_window(tmp_path: Path) -> None:
    """No timer in user code: the Checkpointer compares the steps that end while a save is
    not yet durable with the others. Steps here take 1.0 s of the fake clock, and 1.4 s
    while the previous save is in flight; the stall is 0 on the fake clock."""
    clock = _Clock()
    state = {"x": 1}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "ck", remote=None, clock=clock, every="auto",
                               min_interval=5, max_interval=10) as ckpt:
        for step in ckpt.steps(total=60):
            slow = ckpt._auto.meter.in_window   # a save at the last boundary is not durable yet
            ckpt._writer.wait()                  # (durable: committed locally, no remote)
            clock.t += 1.4 if slow else 1.0
        meter = ckpt._auto.meter
        assert meter.samples >= 4
        assert meter.base == pytest.approx(1.0)
        assert meter.c == pytest.approx(0.4, abs=1e-6)   # 0 stall + one step 0.4 s slower
        assert ckpt._auto.decision.sources["c"].startswith("measured")
