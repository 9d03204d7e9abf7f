"""torch.distributed: torchrun with 2 CPU ranks (gloo). A SIGTERM to one rank stops both at
the same step; the restart (empty local dirs) resumes both from S3; final weights are
bitwise identical to an uninterrupted 2-rank run. A dead rank gives a bounded, clear error."""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, free_port, run_env

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

SCRIPT = str(EXAMPLES / "train_ddp.py")
STEPS = 150


def torchrun(local: Path, remote: str, out: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
         SCRIPT, "--steps", str(STEPS), "--every-steps", "20", "--sleep", "0.02", "--out", str(out)],
        env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=remote, GLOO_SOCKET_IFNAME="lo",
                    SPOTCKPT_GRACE_SECONDS="30", **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_pids(proc: subprocess.Popen) -> tuple[dict[int, int], list[str]]:
    pids, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        # two ranks print at once: their lines can run together
        for m in re.finditer(r"rank (\d) pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if len(pids) == 2:
            return pids, lines
    raise AssertionError("ranks did not start: " + "".join(lines))


def events(local: Path, rank: int) -> list[dict]:
    p = LocalDir(local).part(f"rank-{rank:05d}").meta / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_one_rank_all_stop_same_step_and_resume_bitwise(tmp_path: Path, s3_remote: str) -> None:
    ref_out = tmp_path / "ref.pt"
    ref = torchrun(tmp_path / "ref-local", f"file://{tmp_path}/ref-remote/", ref_out)
    out, _ = ref.communicate(timeout=180)
    assert ref.returncode == 0, out

    final = tmp_path / "final.pt"
    local = tmp_path / "local-1"
    proc = torchrun(local, s3_remote, final)
    pids, head = rank_pids(proc)
    time.sleep(random.uniform(1.0, 2.5))
    victim = random.choice([0, 1])
    import os
    os.kill(pids[victim], signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    text = "".join(head) + out
    assert proc.returncode != 0, text  # torchrun reports the ranks' 143
    assert "exitcode  : 143" in text or "143" in text
    flushes = {r: next(e for e in events(local, r) if e["event"] == "flush") for r in (0, 1)}
    stop_step = flushes[0]["step"]
    assert flushes[1]["step"] == stop_step and 0 < stop_step < STEPS, flushes
    assert flushes[0]["durable"] and flushes[1]["durable"]
    store = RemoteStore(s3_remote)
    assert store.committed()[-1] == stop_step
    m = store.read_manifest(stop_step)
    assert m.world_size == 2 and sorted(f.path for f in m.files) == [
        "rank-00000/state.safetensors", "rank-00001/state.safetensors"]

    proc = torchrun(tmp_path / "local-2", s3_remote, final)  # new containers: empty local dirs
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    resumed = re.findall(r"rank \d pid \d+ resumed at step (\d+)", out)
    assert len(resumed) == 2 and set(resumed) == {str(stop_step)}, out
    a, b = torch.load(ref_out), torch.load(final)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dead_rank_gives_bounded_clear_error(tmp_path: Path) -> None:
    """Without torchrun's agent (which would kill the survivors), a rank that dies must not
    hang the others: the agreement at the next step boundary times out with a clear error."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).parents[1] / "scripts" / "dist_agree_train.py")],
            env=run_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", SPOTCKPT_DIST_TIMEOUT="5",
                        SPOTCKPT_LOCAL_DIR=str(tmp_path / "ck")),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        for line in p.stdout:
            if line.startswith("rank "):
                break
    time.sleep(1.0)
    procs[1].kill()
    t0 = time.monotonic()
    out, _ = procs[0].communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert procs[0].returncode not in (0, 143)
    assert "did a rank die?" in out, out
