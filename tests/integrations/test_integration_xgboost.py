"""XGBoost: examples/train_xgboost.py, SIGTERMed at a random round and restarted with an empty
local dir, resumes from the S3 server and ends with the model dump, evaluation history and
early-stopping result of an uninterrupted run; saves follow the cadence; retention holds.
With row/column subsampling, ``reseed_each_round=True`` makes the resumed model's bytes those
of an uninterrupted run with the option."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import S3Server
from test_integration_common import (check_cadence_and_retention, remote_steps, resumed_step, run,
                                     script_env, sigterm_mid_training, start)

SCRIPT = "train_xgboost.py"
EVERY = 10


@pytest.fixture(scope="module")
def reference(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run, the first of its job: nothing to restore."""
    tmp = tmp_path_factory.mktemp("xgb-ref")
    remote = f"s3://{s3_server.new_bucket()}/ref/"
    out = run(SCRIPT, ["--every-rounds", str(EVERY), "--out", str(tmp / "ref.json")],
              script_env(s3_server, tmp / "local", remote))
    return {"out": out, "local": tmp / "local", "remote": remote,
            "result": json.loads((tmp / "ref.json").read_text())}


def test_first_run_cadence_and_retention(reference: dict, s3_server: S3Server) -> None:
    assert "fresh start at round 0" in reference["out"]
    rounds = len(reference["result"]["dump"])
    assert 20 < rounds < 200, "early stopping should end the run well before num_boost_round"
    check_cadence_and_retention(s3_server, reference["local"], reference["remote"], EVERY, rounds)
    manifest = json.loads(next(reference["local"].glob("step-*/MANIFEST.json")).read_text())
    assert manifest["framework"] == "xgboost"
    assert manifest["serializer"] == "pickle-safe"  # no torch in an XGBoost job


def test_sigterm_mid_training_resumes_from_s3_identical(reference: dict, s3_server: S3Server,
                                                        s3_remote: str, tmp_path: Path) -> None:
    rounds = len(reference["result"]["dump"])
    sleep = 0.05
    proc = start(SCRIPT, ["--every-rounds", str(EVERY), "--sleep", str(sleep)],
                 script_env(s3_server, tmp_path / "local-1", s3_remote))
    out1 = sigterm_mid_training(proc, rounds * sleep, random.Random())
    durable = remote_steps(s3_server, s3_remote)[-1]
    assert 0 < durable < rounds, out1

    out2 = run(SCRIPT, ["--every-rounds", str(EVERY), "--out", str(tmp_path / "final.json")],
               script_env(s3_server, tmp_path / "local-2", s3_remote))  # a new machine
    assert resumed_step(out2) == durable, out1 + out2
    final = json.loads((tmp_path / "final.json").read_text())
    ref = reference["result"]
    assert final["dump"] == ref["dump"]
    assert final["history"] == ref["history"]
    assert (final["best_iteration"], final["best_score"]) == (ref["best_iteration"], ref["best_score"])


def test_finished_job_trains_nothing_more(reference: dict, s3_server: S3Server, tmp_path: Path) -> None:
    """Restarting a job that early-stopped restores its end state and returns the same model."""
    out = run(SCRIPT, ["--every-rounds", str(EVERY), "--out", str(tmp_path / "again.json")],
              script_env(s3_server, tmp_path / "fresh-local", reference["remote"]))
    assert resumed_step(out) == len(reference["result"]["dump"])
    assert json.loads((tmp_path / "again.json").read_text()) == reference["result"]


def test_plain_xgboost_train_refuses_to_start_over_a_checkpoint(tmp_path: Path) -> None:
    code = f"""
import numpy as np, xgboost as xgb
import spotckpt
from spotckpt.integrations.xgboost import SpotCheckpoint, train
d = xgb.DMatrix(np.arange(40.0).reshape(20, 2), label=np.arange(20.0))
opts = dict(local_dir={str(tmp_path / 'ck')!r}, remote=None)
train({{"nthread": 1}}, d, 4, verbose_eval=False, callbacks=[SpotCheckpoint(every_n_rounds=2, **opts)])
try:
    xgb.train({{"nthread": 1}}, d, 4, callbacks=[SpotCheckpoint(**opts)])
except spotckpt.SpotckptError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "a checkpoint of round 4 exists" in out.stdout
    assert "spotckpt.integrations.xgboost.train" in out.stdout


SAMPLED = ["--subsample", "0.7", "--colsample", "0.7", "--reseed-each-round", "--rounds", "40",
           "--early-stopping", "50", "--every-rounds", "5"]


def test_reseed_each_round_resumes_subsampled_training_bitwise(s3_server: S3Server, s3_remote: str,
                                                               tmp_path: Path) -> None:
    """Regression: with subsample/colsample < 1 a resumed model differed from an uninterrupted
    run's in every tree trained after the resume (XGBoost reseeds its samplers when a model
    is loaded); with the option its bytes are equal."""
    ref_remote = f"s3://{s3_server.new_bucket()}/ref/"
    run(SCRIPT, [*SAMPLED, "--out", str(tmp_path / "ref.json")], script_env(s3_server, tmp_path / "ref", ref_remote))
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert len(ref["dump"]) == 40

    sleep = 0.05
    proc = start(SCRIPT, [*SAMPLED, "--sleep", str(sleep)], script_env(s3_server, tmp_path / "local-1", s3_remote))
    out1 = sigterm_mid_training(proc, 40 * sleep, random.Random())
    durable = remote_steps(s3_server, s3_remote)[-1]
    assert 0 < durable < 40, out1
    out2 = run(SCRIPT, [*SAMPLED, "--out", str(tmp_path / "final.json")],
               script_env(s3_server, tmp_path / "local-2", s3_remote))  # a new machine
    assert resumed_step(out2) == durable, out1 + out2
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["dump"] == ref["dump"], out1 + out2
    assert final["model_sha256"] == ref["model_sha256"]
