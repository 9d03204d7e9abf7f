"""Keras 3 (torch backend): examples/train_keras.py, SIGTERMed mid-epoch at a random moment and
right after an epoch's last batch, and restarted with an empty local dir, resumes from the S3
server and ends with weights identical to an uninterrupted run (tolerance zero, mid-epoch
included); saves follow the cadence; retention holds."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, S3Server
from test_integration_common import (check_cadence_and_retention, remote_steps, resumed_step, run,
                                     script_env, sigterm_mid_training, start)

SCRIPT = "train_keras.py"
EPOCHS, BATCHES_PER_EPOCH, EVERY = 4, 40, 10  # 1280 samples / batch size 32
ARGS = ["--epochs", str(EPOCHS), "--every-batches", str(EVERY)]

# The example, with a SIGTERM that the process sends itself after a chosen batch, when the
# SpotCheckpoint has already handled that batch: the notice is seen at the epoch's end.
KILL_AFTER_BATCH = """
import os, signal, sys
sys.path.insert(0, {examples!r})
import train_keras as ex

class Progress(ex.Progress):
    seen = 0
    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        Progress.seen += 1
        if Progress.seen == {step}:
            os.kill(os.getpid(), signal.SIGTERM)

ex.Progress = Progress
ex.main()
"""


def keras_env(s3: S3Server, local: Path, remote: str) -> dict[str, str]:
    return script_env(s3, local, remote, KERAS_BACKEND="torch")


def load(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), f"max abs weight difference {diff}"


@pytest.fixture(scope="module")
def reference(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run, the first of its job: nothing to restore."""
    tmp = tmp_path_factory.mktemp("keras-ref")
    remote = f"s3://{s3_server.new_bucket()}/ref/"
    out = run(SCRIPT, [*ARGS, "--out", str(tmp / "ref.npz")], keras_env(s3_server, tmp / "local", remote))
    return {"out": out, "local": tmp / "local", "remote": remote, "weights": load(tmp / "ref.npz")}


def test_first_run_cadence_and_retention(reference: dict, s3_server: S3Server) -> None:
    assert "fresh start at step 0" in reference["out"]
    assert f"epoch {EPOCHS - 1} loss" in reference["out"]
    check_cadence_and_retention(s3_server, reference["local"], reference["remote"], EVERY,
                                EPOCHS * BATCHES_PER_EPOCH)


def test_sigterm_mid_epoch_resumes_from_s3_identical(reference: dict, s3_server: S3Server,
                                                     s3_remote: str, tmp_path: Path) -> None:
    sleep = 0.02
    proc = start(SCRIPT, [*ARGS, "--sleep", str(sleep)], keras_env(s3_server, tmp_path / "local-1", s3_remote))
    out1 = sigterm_mid_training(proc, EPOCHS * BATCHES_PER_EPOCH * sleep, random.Random())
    durable = remote_steps(s3_server, s3_remote)[-1]
    assert 0 < durable < EPOCHS * BATCHES_PER_EPOCH, out1

    out2 = run(SCRIPT, [*ARGS, "--out", str(tmp_path / "final.npz")],
               keras_env(s3_server, tmp_path / "local-2", s3_remote))  # a new machine
    assert resumed_step(out2) == durable, out1 + out2
    assert_identical(load(tmp_path / "final.npz"), reference["weights"])
    # every epoch's log line, the interrupted epoch's (its finished batches included) too,
    # is the reference's
    logged = [ln for ln in out2.splitlines() if ln.startswith("epoch ")]
    assert logged and all(ln in reference["out"].splitlines() for ln in logged), out2


def test_sigterm_at_an_epoch_boundary_resumes_identical(reference: dict, s3_server: S3Server,
                                                        s3_remote: str, tmp_path: Path) -> None:
    boundary = 2 * BATCHES_PER_EPOCH
    wrapper = tmp_path / "kill_after_batch.py"
    wrapper.write_text(KILL_AFTER_BATCH.format(examples=str(EXAMPLES), step=boundary))
    args = ["--epochs", str(EPOCHS), "--every-batches", "7"]  # so no periodic save falls on it
    proc = start(wrapper, args, keras_env(s3_server, tmp_path / "local-1", s3_remote))
    out1, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out1
    assert remote_steps(s3_server, s3_remote)[-1] == boundary, out1

    out2 = run(SCRIPT, [*args, "--out", str(tmp_path / "final.npz")],
               keras_env(s3_server, tmp_path / "local-2", s3_remote))
    assert resumed_step(out2) == boundary, out2
    assert "epoch 1 loss" not in out2  # resumed at the start of epoch 2: nothing replayed
    assert_identical(load(tmp_path / "final.npz"), reference["weights"])
