"""`spotckpt run -- torchrun --nproc-per-node 2 train.py` (issue 26, item 1): the README's
DDP recipe and what the Docker ENTRYPOINT runs. Each rank uploads its own part (the
supervisor serves one process's ``step-N/`` only) in the supervisor's generation of the job
(a claim of their own would make the supervisor stale), and the supervisor still mirrors
the files the script writes, but not the ranks' part dirs. Real torchrun, 2 CPU ranks
(gloo), the S3 test server, a real SIGTERM to the supervisor, a restart on empty local dirs,
final weights bitwise equal to an uninterrupted run's.
"""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, free_port, remote_files, run_env
from proc_helpers import PY, Proc, run, spotckpt, wait_until

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

SCRIPT = str(EXAMPLES / "train_ddp.py")
STEPS = 120


def _torchrun(*args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), SCRIPT, "--steps", str(STEPS), "--every-steps", "10", *args]


def _supervised(local: Path, remote: str, *args: str) -> list[str]:
    return spotckpt("run", "--local-dir", str(local), "--remote", remote, "--grace", "40", "--", *_torchrun(*args))


def _events(local: Path, rank: int | None = None) -> list[dict]:
    d = LocalDir(local) if rank is None else LocalDir(local).part(f"rank-{rank:05d}")
    p = d.meta / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.slow
def test_supervised_torchrun_checkpoints_stops_on_sigterm_and_resumes_bitwise(tmp_path: Path, s3_remote: str) -> None:
    env = run_env(GLOO_SOCKET_IFNAME="lo")
    ref = run(_torchrun("--out", str(tmp_path / "ref.pt")),
              env=run_env(GLOO_SOCKET_IFNAME="lo", SPOTCKPT_LOCAL_DIR=str(tmp_path / "ref-local"),
                          SPOTCKPT_REMOTE=f"file://{tmp_path}/ref-remote/"), timeout=600)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    local = tmp_path / "local-1"
    local.mkdir()
    (local / "notes.txt").write_text("a file the script's user keeps here\n")
    p = Proc(_supervised(local, s3_remote, "--sleep", "0.05", "--out", str(tmp_path / "final.pt")), env=env)
    store = RemoteStore(s3_remote)
    wait_until(lambda: store.committed() or p.p.poll() is not None, 300, "a first checkpoint on the remote")
    assert p.p.poll() is None, p.stdout + p.stderr
    p.p.send_signal(signal.SIGTERM)
    assert p.finish(120) == 143, p.stdout + p.stderr
    flushes = {r: [e for e in _events(local, r) if e["event"] == "flush"] for r in (0, 1)}
    assert flushes[0] and flushes[1], (p.stdout, p.stderr)
    stop = flushes[0][0]["step"]
    assert flushes[1][0]["step"] == stop and flushes[0][0]["durable"] and flushes[1][0]["durable"], flushes
    assert 0 < stop < STEPS and store.committed()[-1] == stop
    m = store.read_manifest(stop)
    assert m.world_size == 2 and sorted(f.path for f in m.files) == ["rank-00000/state.pt", "rank-00001/state.pt"]
    assert f"checkpoint step {stop} (uploaded by the command's 2 ranks)" in p.stderr, p.stderr
    # one generation for the supervisor and the ranks: neither was stopped as stale
    assert "StaleGenerationError" not in p.stderr + p.stdout
    # the supervisor mirrors the user's files, not the ranks' part dirs
    files = remote_files(s3_remote)
    assert "notes.txt" in files and not [f for f in files if f.startswith("rank-")], sorted(files)

    local2 = tmp_path / "local-2"  # a new instance: empty local dir
    p = Proc(_supervised(local2, s3_remote, "--out", str(tmp_path / "final.pt")), env=env)
    assert p.finish(600) == 0, p.stdout + p.stderr
    assert re.findall(r"rank \d pid \d+ resumed at step (\d+)", p.stdout) == [str(stop)] * 2, p.stdout
    assert (local2 / "notes.txt").exists()
    # the supervisor did not pull every rank's part into its dir: each rank fetched its own
    assert not list(local2.glob("step-*")), sorted(p.name for p in local2.iterdir())
    assert "each rank restores its own part" in p.stderr
    a, b = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert store.committed()[-1] == STEPS


@pytest.mark.slow
def test_one_process_under_the_supervisor_refuses_a_two_rank_checkpoint(tmp_path: Path) -> None:
    """The supervisor does not pull a torch.distributed checkpoint (its ranks restore their
    own parts); a command of one process must then still stop with WorldSizeError, never
    start fresh beside it."""
    remote = f"file://{tmp_path}/remote/"
    env = run_env(GLOO_SOCKET_IFNAME="lo")
    r = run(spotckpt("run", "--local-dir", str(tmp_path / "l1"), "--remote", remote, "--",
                     *_torchrun("--steps", "10")), env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    one = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), SCRIPT, "--steps", "20", "--every-steps", "10"]
    r = run(spotckpt("run", "--local-dir", str(tmp_path / "l2"), "--remote", remote, "--", *one), env=env, timeout=600)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "WorldSizeError" in r.stderr and "step 10" in r.stderr and "2 rank(s)" in r.stderr, r.stderr
    assert RemoteStore(remote).committed() == [10]


DIR_JOB = """
import pathlib, sys
import spotckpt
src = pathlib.Path(sys.argv[1])
src.mkdir(exist_ok=True)
(src / "a.bin").write_bytes(b"a" * 10)
(src / "b.bin").write_bytes(b"b" * 20)
with spotckpt.Checkpointer(None) as ck:
    ck.commit_dir(src, 5)
"""


def test_a_pulled_checkpoint_of_several_files_is_durable_as_it_is(tmp_path: Path) -> None:
    """A start pulls the newest checkpoint and hands it to its uploader, which finds it
    committed already. With more than one file (a torch.distributed part, a directory
    checkpoint) that comparison raised TypeError (FileEntry is not ordered): the final flush
    was never durable (found by the torchrun restart of item 1)."""
    remote = f"file://{tmp_path}/remote/"
    r = run(spotckpt("run", "--local-dir", str(tmp_path / "l1"), "--remote", remote, "--",
                     PY, "-c", DIR_JOB, str(tmp_path / "src")), env=run_env(), timeout=120)
    assert r.returncode == 0 and "durable at" in r.stderr, r.stdout + r.stderr
    assert len(RemoteStore(remote).read_manifest(5).files) == 2
    r = run(spotckpt("run", "--local-dir", str(tmp_path / "l2"), "--remote", remote, "--", PY, "-c", "pass"),
            env=run_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "durable at" in r.stderr and "checkpoint step 5" in r.stderr and "NOT" not in r.stderr, r.stderr
