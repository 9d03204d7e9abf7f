"""Finding 8 of issue 11: a backlog of user files must not block the interruption save.

A script that dumped 10,000 small files into its checkpoint dir is SIGTERMed while they
are being mirrored, with 15 s of grace: its step checkpoint must be durable (it was not: the
free-form mirror uploaded the files ahead of it and the checkpoint never went up, although
the planner estimated 0.5 s). Under ``spotckpt run`` and in-process (a Checkpointer with
the remote set), against the S3 server. Also: the supervisor's deadline plan counts the
backlog of the watched dir.
"""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import run_env
from proc_helpers import PY, REPO, Proc, spotckpt, wait_until

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

SCRIPT = str(REPO / "tests" / "scripts" / "backlog_train.py")
FILES = 10_000


def _mirroring(local: Path) -> bool:
    """True once the watched dir's files are going up (a mirror pass is under way)."""
    p = LocalDir(local).meta / "events.jsonl"
    try:
        return any(json.loads(x).get("event") == "mirror_upload" for x in p.read_text().splitlines() if x)
    except (OSError, ValueError):
        return False


def _interrupt_and_check(p: Proc, local: Path, remote: str) -> float:
    p.wait_for(rf"^wrote {FILES} files", 120)
    wait_until(lambda: _mirroring(local), 60, "the mirror of the files to start")
    t0 = time.monotonic()
    p.p.send_signal(signal.SIGTERM)
    rc = p.finish(60)
    took = time.monotonic() - t0
    assert rc == 143, f"exit status {rc}\n{p.stderr[-3000:]}"
    step = int(p.wait_for(r"saved at the notice: step (\d+)", 1).group(1))
    committed = RemoteStore(remote).committed()
    assert step in committed, f"step {step} is not durable (remote: {committed})\n{p.stderr[-3000:]}"
    return took


@pytest.mark.slow
def test_step_checkpoint_is_durable_behind_a_backlog_under_spotckpt_run(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ck"
    p = Proc(spotckpt("run", "--local-dir", str(local), "--remote", s3_remote, "--grace", "15", "--",
                      PY, SCRIPT, "--files", str(FILES)), env=run_env())
    try:
        took = _interrupt_and_check(p, local, s3_remote)
    finally:
        p.kill()
    print(f"[backlog] spotckpt run: SIGTERM to exit {took:.1f} s")


@pytest.mark.slow
def test_step_checkpoint_is_durable_behind_a_backlog_in_process(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ck"
    p = Proc([PY, SCRIPT, "--files", str(FILES)],
             env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=s3_remote, SPOTCKPT_GRACE_SECONDS="15"))
    try:
        took = _interrupt_and_check(p, local, s3_remote)
    finally:
        p.kill()
    print(f"[backlog] in-process: SIGTERM to exit {took:.1f} s")


def test_the_supervisors_deadline_plan_counts_the_watched_dir_backlog(tmp_path: Path) -> None:
    """The final upload's estimate (which sets when the child is killed to leave time for
    it) includes the watched dir's changed files not yet committed, not only the newest
    step checkpoint."""
    from types import SimpleNamespace

    from spotckpt._config import Config
    from spotckpt._supervisor._supervisor import Supervisor

    sup = Supervisor([PY, "-c", "pass"], Config.resolve(local_dir=tmp_path / "ck", remote=None))
    watcher = SimpleNamespace(backlog_bytes=0)
    sup.syncer = SimpleNamespace(bytes_uploaded=200_000_000, upload_seconds=2.0, watcher=watcher)  # 100 MB/s
    idle = sup._final_upload_estimate()
    watcher.backlog_bytes = 400_000_000  # 4 s at the measured rate
    assert sup._final_upload_estimate() >= idle + 4.0
    sup.syncer.watcher = None  # no watched dir (mirror off): the step checkpoint only
    assert sup._final_upload_estimate() == idle
