"""The docker/ entrypoint, run as PID 1 of a fresh PID namespace (no Docker engine needed).

`unshare --pid --fork --mount-proc` gives the entrypoint command what a container gives it:
PID 1, no init to reap orphans, and a kernel that ignores signals PID 1 has no handler for.
The test then acts as Docker does on `docker stop`: SIGTERM to PID 1, SIGKILL after the grace.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import run_env
from proc_helpers import PY, REPO, Proc, wait_until
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

DOCKER = REPO / "docker"


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "echo $$"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() == "1"


needs_pidns = pytest.mark.skipif(not _unshare_works(), reason="needs unshare --pid (root or user namespaces)")


def _instruction(name: str) -> list[str]:
    text = (DOCKER / "Dockerfile").read_text()
    m = re.search(rf"^{name}\s+(\[.*\])\s*$", text, re.M)
    assert m, f"Dockerfile has no exec-form {name}"
    return json.loads(m.group(1))


def _entrypoint(*cmd: str) -> list[str]:
    """The image's ENTRYPOINT with this checkout's `spotckpt` and python."""
    ep = _instruction("ENTRYPOINT")
    ep[0] = str(Path(PY).with_name(ep[0]))
    cmd_ = list(cmd) or _instruction("CMD")
    return [PY if c == "python" else c for c in [*ep, *cmd_]]


def _pid1(p: Proc) -> psutil.Process:
    """The host-side process that is PID 1 inside the namespace (unshare's forked child)."""
    kids = wait_until(lambda: psutil.Process(p.pid).children(), 10, "the namespace's PID 1")
    return kids[0]


def test_dockerfile_uses_exec_form_entrypoint_through_spotckpt_run() -> None:
    ep = _instruction("ENTRYPOINT")
    assert ep[:2] == ["spotckpt", "run"]
    assert _instruction("CMD")[0] == "python"


def test_compose_has_minio_bucket_and_trainer_with_endpoint() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert {"minio", "createbuckets", "trainer"} <= set(services)
    trainer = services["trainer"]
    assert trainer["environment"]["AWS_ENDPOINT_URL_S3"].startswith("http://minio:")
    assert trainer["environment"]["SPOTCKPT_REMOTE"].startswith("s3://")
    assert trainer["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"
    script = (DOCKER / "interrupt.sh").read_text()
    assert "kill -s SIGTERM" in script and os.access(DOCKER / "interrupt.sh", os.X_OK)


@pytest.mark.slow
@needs_pidns
def test_pid1_forwards_sigterm_reaps_and_flushes(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ckpt"
    env = run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=s3_remote, SPOTCKPT_GRACE_SECONDS="15")
    # The image's CMD, behind a shell that leaves a short-lived orphan for PID 1 to reap.
    cmd = " ".join(_instruction("CMD")).replace("python", PY)
    argv = ["unshare", "--pid", "--fork", "--mount-proc",
            *_entrypoint("sh", "-c", f"(sleep 0.3 &); exec {cmd}")]
    p = Proc(argv, env=env, cwd=REPO)
    p.wait_for(r"^step 150 ", 60)
    pid1 = _pid1(p)
    assert pid1.cmdline()[1:4] == [str(Path(PY).with_name("spotckpt")), "run", "--"] or "run" in pid1.cmdline()
    zombies = [c for c in pid1.children() if c.status() == psutil.STATUS_ZOMBIE]
    assert not zombies, "PID 1 left a zombie unreaped"
    pid1.send_signal(signal.SIGTERM)                  # docker stop / compose kill -s SIGTERM
    try:
        rc = p.p.wait(15)
    except subprocess.TimeoutExpired:
        pid1.kill()                                   # what Docker does after the grace
        p.finish(10)
        raise AssertionError(f"PID 1 did not exit within the grace\n{p.stderr}")
    p.finish(5)
    assert rc == 143, p.stderr
    events = [json.loads(line) for line in (LocalDir(local).meta / "events.jsonl").read_text().splitlines()]
    step = next(e["step"] for e in events if e["event"] == "notice" and "step" in e)  # the trainer's save
    assert RemoteStore(s3_remote).committed()[-1] == step
    assert f"durable at {s3_remote}: checkpoint step {step}" in p.stderr

    # A new container (empty local dir) resumes from the remote at that step.
    shutil.rmtree(local)
    q = Proc(argv, env=env, cwd=REPO)
    q.wait_for(rf"^resumed at step {step}$", 60)
    _pid1(q).send_signal(signal.SIGTERM)
    assert q.finish(20) == 143


@needs_pidns
def test_pid1_kills_a_child_that_ignores_sigterm_before_docker_would(tmp_path: Path) -> None:
    grace = 4.0
    env = run_env(SPOTCKPT_LOCAL_DIR=str(tmp_path / "ckpt"), SPOTCKPT_REMOTE=f"file://{tmp_path}/remote/",
                  SPOTCKPT_GRACE_SECONDS=str(grace))
    code = ("import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen(['sleep', '300']); print('ready', flush=True); time.sleep(300)")
    p = Proc(["unshare", "--pid", "--fork", "--mount-proc", *_entrypoint("python", "-c", code)], env=env)
    p.wait_for("^ready$", 30)
    pid1 = _pid1(p)
    sleeper = next(c for c in pid1.children(recursive=True) if c.name() == "sleep")
    t0 = time.monotonic()
    pid1.send_signal(signal.SIGTERM)
    try:
        rc = p.p.wait(grace)
    except subprocess.TimeoutExpired:
        pid1.kill()
        p.finish(10)
        raise AssertionError(f"Docker would have had to SIGKILL PID 1\n{p.stderr}")
    p.finish(5)
    assert rc == 143, p.stderr                        # interrupted (the child itself was SIGKILLed)
    assert time.monotonic() - t0 < grace
    assert "killed it (SIGKILL)" in p.stderr
    assert not psutil.pid_exists(sleeper.pid)
