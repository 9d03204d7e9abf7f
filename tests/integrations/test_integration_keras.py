"""Keras 3 on the torch, JAX and TensorFlow backends: examples/train_keras.py (with a user
callback that records the batches it sees, tests/scripts/keras_recorded.py), SIGTERMed mid-epoch
after a random batch and then at an epoch's end, each time restarted on an empty local dir from
the S3 server, ends with weights identical to an uninterrupted run's (tolerance zero). The
user callback never sees a batch trained before the interruption; resuming a finished ``fit``
trains and fetches nothing; saves follow the cadence; retention holds.

Every process sets KERAS_BACKEND; a backend that does not import fails its test (the test
extra installs jax[cpu] and tensorflow-cpu)."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, S3Server
from test_integration_common import (check_cadence_and_retention, guide_snippets, remote_steps,
                                     resumed_step, script_env)

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

SCRIPT = REPO / "tests" / "scripts" / "keras_recorded.py"
EPOCHS, N, EVERY = 3, 40, 10  # 1280 samples / batch size 32
TOTAL = EPOCHS * N
ARGS = ["--epochs", str(EPOCHS), "--every-batches", str(EVERY)]
BACKENDS = ["torch", "jax", "tensorflow"]


def keras_run(backend: str, s3: S3Server, local: Path, remote: str, args: list[str] = (), *,
              pause_at: int | None = None, extra_env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the recorded example to its end; with ``pause_at``, SIGTERM it while it waits after
    that batch of the job. Returns (exit status, output)."""
    env = script_env(s3, local, remote, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **(extra_env or {}))
    argv = [sys.executable, str(SCRIPT), *ARGS, *args] + (["--pause-at", str(pause_at)] if pause_at else [])
    proc = subprocess.Popen(argv, env=env, cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    head = []
    if pause_at:
        assert proc.stdout is not None and proc.stdin is not None
        for line in proc.stdout:
            head.append(line)
            if line.startswith("paused at"):
                proc.send_signal(signal.SIGTERM)
                proc.stdin.write("\n")
                proc.stdin.flush()
                break
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, "".join(head) + out


def seen(out: str, what: str = "") -> list[int]:
    """The job's batches (0-based, counted over epochs) the user callback saw end (or begin)."""
    return [int(e) * N + int(b) for e, b in re.findall(rf"^seen batch (\d+) (\d+){what}$", out, re.M)]


def durable_after_pause(step: int) -> int:
    """The step saved when the SIGTERM comes while the user callback (after the SpotCheckpoint)
    waits after batch ``step``: the SpotCheckpoint sees the notice at the next batch's end, or,
    after an epoch's last batch, at the epoch's end."""
    return step if step % N == 0 else step + 1


def load(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), f"max abs weight difference {diff}"


def epoch_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("epoch ")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_interrupted_mid_epoch_and_at_epoch_end_resumes_bitwise(backend: str, s3_server: S3Server, s3_remote: str,
                                                                 tmp_path: Path) -> None:
    # the reference: uninterrupted, the first run of its job
    ref_remote = f"s3://{s3_server.new_bucket()}/ref/"
    rc, ref = keras_run(backend, s3_server, tmp_path / "ref", ref_remote, ["--out", str(tmp_path / "ref.npz")])
    assert rc == 0, ref
    assert "fresh start at step 0" in ref and f"epoch {EPOCHS - 1} loss" in ref
    assert seen(ref) == seen(ref, " begin") == list(range(TOTAL)), ref
    check_cadence_and_retention(s3_server, tmp_path / "ref", ref_remote, EVERY, TOTAL)
    weights = load(tmp_path / "ref.npz")

    # the finished job run again on a new machine: restores it, trains and fetches nothing
    rc, again = keras_run(backend, s3_server, tmp_path / "again", ref_remote, ["--out", str(tmp_path / "again.npz")])
    assert rc == 0, again
    assert resumed_step(again) == TOTAL, again
    assert not re.search(r"^(seen|epoch )", again, re.M), again  # no epoch began: no batch fetched
    assert_identical(load(tmp_path / "again.npz"), weights)

    # SIGTERM after a random batch, so that the save is mid-epoch in epoch 0 or 1
    rng = random.Random()
    first = rng.choice([s for s in range(1, 2 * N - 2) if durable_after_pause(s) % N])
    rc, out1 = keras_run(backend, s3_server, tmp_path / "local-1", s3_remote, pause_at=first)
    assert rc == 143 and "durable" in out1, out1
    durable1 = durable_after_pause(first)
    assert remote_steps(s3_server, s3_remote)[-1] == durable1, out1

    # a new machine resumes at the next batch (the user callback sees no batch before it);
    # SIGTERM during epoch 1's last batch or right after it: saved as the start of epoch 2
    second = rng.choice([2 * N - 1, 2 * N])
    rc, out2 = keras_run(backend, s3_server, tmp_path / "local-2", s3_remote, pause_at=second)
    assert rc == 143, out2
    assert resumed_step(out2) == durable1, out2
    assert seen(out2) == seen(out2, " begin") == list(range(durable1, durable_after_pause(second))), out2
    assert remote_steps(s3_server, s3_remote)[-1] == 2 * N, out2

    # and the next resumes at epoch 2's first batch, replaying nothing
    rc, out3 = keras_run(backend, s3_server, tmp_path / "local-3", s3_remote, ["--out", str(tmp_path / "final.npz")])
    assert rc == 0, out3
    assert resumed_step(out3) == 2 * N, out3
    assert seen(out3) == seen(out3, " begin") == list(range(2 * N, TOTAL)), out3
    assert "epoch 1 loss" not in out3 and "seen validation" in out3, out3
    assert_identical(load(tmp_path / "final.npz"), weights)
    # every epoch's log line after a resume, the interrupted epoch's (its metrics over the
    # batches before the interruption included), is the reference's
    logged = epoch_lines(out2) + epoch_lines(out3)
    assert logged and all(ln in epoch_lines(ref) for ln in logged), f"{out1}\n{out2}\n{out3}"


def test_readme_snippet_on_jax(tmp_path: Path) -> None:
    """The Keras guide's snippet (docs/guides/keras.md), run as written on JAX, then again: it
    restores the finished job."""
    code = guide_snippets()["keras"].replace('local_dir="/tmp/', f'local_dir="{tmp_path}/')
    (tmp_path / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTCKPT_")}
    env["KERAS_BACKEND"] = "jax"
    runs = [subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    for p in runs:
        assert p.returncode == 0, p.stdout + p.stderr
    assert "spotckpt: resuming" not in runs[0].stderr and "spotckpt: resuming" in runs[1].stderr
    assert runs[0].stdout.splitlines()[-1] == runs[1].stdout.splitlines()[-1]


def test_keras_without_fast_forward_restarts_the_epoch(s3_server: S3Server, s3_remote: str, tmp_path: Path) -> None:
    """Where fit's loop cannot be found (another Keras version), a mid-epoch checkpoint resumes
    at the start of its epoch, with a warning, instead of failing."""
    rc, out1 = keras_run("jax", s3_server, tmp_path / "local-1", s3_remote, pause_at=N + 5)
    assert rc == 143, out1
    rc, out2 = keras_run("jax", s3_server, tmp_path / "local-2", s3_remote,
                         extra_env={"SPOTCKPT_TEST_NO_FAST_FORWARD": "1"})
    assert rc == 0, out2
    assert resumed_step(out2) == N + 6 and "cannot fast-forward" in out2, out2
    assert seen(out2)[:2] == [N, N + 1] and seen(out2)[-1] == TOTAL - 1, out2
