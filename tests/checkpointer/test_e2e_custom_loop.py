"""A real training process, SIGTERMed three times at random moments, each restart with an
empty local dir, resumes from the S3 server and ends bitwise identical to an uninterrupted run."""
from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, run_env

from spotckpt._remote._store import RemoteStore

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

SCRIPT = str(EXAMPLES / "train_custom_loop.py")
STEPS = 600  # 3 interruptions of up to 1.5 s each must not reach the end (~80 steps/s)


def start(local: Path, remote: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, "--steps", str(STEPS), "--every-steps", "25", "--sleep", "0.01",
         "--out", str(out)],
        env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=remote, SPOTCKPT_GRACE_SECONDS="20"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until_training(proc: subprocess.Popen) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(("fresh start", "resumed at")):
            return lines
    raise AssertionError("process ended before training: " + "".join(lines))


def test_three_sigterms_resume_bitwise_identical(tmp_path: Path, s3_remote: str) -> None:
    rng = random.Random()
    # uninterrupted reference, on its own remote
    ref_out = tmp_path / "ref.pt"
    ref = start(tmp_path / "ref-local", f"file://{tmp_path}/ref-remote/", ref_out)
    out, _ = ref.communicate(timeout=120)
    assert ref.returncode == 0, out

    final = tmp_path / "final.pt"
    store = RemoteStore(s3_remote)
    resumed_at: list[int] = []
    durable_before: list[int] = []
    for attempt in range(3):
        local = tmp_path / f"local-{attempt}"  # a new container: empty local dir
        proc = start(local, s3_remote, final)
        head = read_until_training(proc)
        m = re.match(r"resumed at step (\d+)", head[-1])
        resumed_at.append(int(m.group(1)) if m else -1)
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 143, "".join(head) + out
        assert "durable" in out
        durable_before.append(store.committed()[-1])
    proc = start(tmp_path / "local-last", s3_remote, final)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    m = re.search(r"resumed at step (\d+)", out)
    resumed_at.append(int(m.group(1)))

    # each restart picked the newest committed step, which the interrupted run made durable
    assert resumed_at[1:] == durable_before, (resumed_at, durable_before)
    assert all(0 < s < STEPS for s in durable_before)
    a, b = torch.load(ref_out), torch.load(final)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
