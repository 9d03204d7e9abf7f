"""every="auto" through each framework callback (Lightning, Keras, XGBoost, Transformers):
refused together with the callback's own step cadence at construction, one line naming
both; accepted alone, it reaches the Checkpointer, which decides and saves on its own
schedule during a real (tiny) training run."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from spotckpt._commit import LocalDir

SCRIPT = REPO / "tests" / "scripts" / "auto_callbacks.py"
STEPS = {"lightning": "every_n_steps", "keras": "every_n_batches", "xgboost": "every_n_rounds",
         "transformers": "every_n_steps"}


@pytest.mark.slow
@pytest.mark.parametrize("framework", list(STEPS))
def test_each_callback_accepts_every_auto(tmp_path: Path, framework: str) -> None:
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    local = tmp_path / "ck"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTCKPT_")}
    env.update(KERAS_BACKEND="torch", HF_HUB_OFFLINE="1", SPOTCKPT_METADATA="off", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, str(SCRIPT), framework, str(local)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    refused = next(line for line in p.stdout.splitlines() if line.startswith(("refused", "NOT refused")))
    # one line, naming the callback's own setting
    assert refused == (f"refused: ConfigError: spotckpt: every='auto' together with {STEPS[framework]}: choose one "
                       f"(auto picks the interval itself, {STEPS[framework]} fixes it)"), refused
    assert "trained" in p.stdout
    meta = LocalDir(local).meta
    events = [json.loads(x) for x in (meta / "events.jsonl").read_text().splitlines()]
    decisions = [e for e in events if e["event"] == "schedule"]
    assert decisions and decisions[0]["how"] == "first" and decisions[0]["interval_s"] == pytest.approx(0.05)
    # saves on its own schedule, and measured the cost of one
    saved = [e for e in events if e["event"] == "saved"]
    assert len(saved) >= 2, [e["event"] for e in events]
    assert any(d["c_s"] is not None for d in decisions), decisions
    assert json.loads((meta / "schedule.json").read_text())["interval_s"] > 0
