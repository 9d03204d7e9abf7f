"""`spotckpt run`: real subprocesses, real signals, a real S3 server.

Unmodified SageMaker-style scripts (torch.save of checkpoint.pth; Keras ModelCheckpoint)
are interrupted under the supervisor and restarted with an empty local dir, as a new
instance would be; their final weights must equal an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import remote_files, run_env
from proc_helpers import EXAMPLES, PY, Proc, run, spotckpt, wait_until
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore


def _events(local: Path) -> list[dict]:
    p = LocalDir(local).meta / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _run_argv(local: Path, remote: str, *cmd: str, grace: float = 20, extra: tuple[str, ...] = ()) -> list[str]:
    return spotckpt("run", "--local-dir", str(local), "--remote", remote, "--grace", str(grace),
                    "--scan-interval", "0.3", *extra, "--", *cmd)


def _tensors_equal(a: Path, b: Path) -> bool:
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- unmodified scripts ------------------------------------------------------------------
@pytest.mark.slow
def test_torch_save_script_survives_sigterm_and_resumes_from_remote(tmp_path: Path, s3_remote: str) -> None:
    script = str(EXAMPLES / "sagemaker_style_torch.py")
    base = run([PY, script, "--checkpoint-dir", str(tmp_path / "base"), "--epochs", "6",
                "--out", str(tmp_path / "base.pt")], env=run_env())
    assert base.returncode == 0, base.stderr

    a = tmp_path / "instance-a"
    p = Proc(_run_argv(a, s3_remote, PY, script, "--checkpoint-dir", str(a), "--epochs", "6",
                       "--sleep", "0.8", "--out", str(tmp_path / "final.pt")), env=run_env())
    p.wait_for(r"^epoch 2 .* saved", 60)
    os.kill(p.pid, signal.SIGTERM)
    assert p.finish(30) == 143, p.stderr            # the script died of SIGTERM: 128 + 15
    assert "durable at" in p.stderr
    assert "checkpoint.pth" in remote_files(s3_remote)
    assert not (tmp_path / "final.pt").exists()

    b = tmp_path / "instance-b"                     # a new instance: empty local dir
    q = Proc(_run_argv(b, s3_remote, PY, script, "--checkpoint-dir", str(b), "--epochs", "6",
                       "--out", str(tmp_path / "final.pt")), env=run_env())
    assert q.finish(60) == 0, q.stderr
    m = q.wait_for(r"resumed from checkpoint.pth at epoch (\d+)", 1)
    assert int(m.group(1)) >= 3                     # epochs 0..2 were saved before the SIGTERM
    assert _tensors_equal(tmp_path / "final.pt", tmp_path / "base.pt")
    # The finished run's checkpoint went up too (the Syncer mirrors it once closed).
    assert "pulled from" in q.stderr and "1 file(s) of the watched dir" in q.stderr


def _h5_weights(path: Path) -> list:
    h5py = pytest.importorskip("h5py")
    out: list = []
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.append((n, o[()])) if isinstance(o, h5py.Dataset) else None)
    return out


@pytest.mark.slow
def test_keras_model_checkpoint_script_survives_and_resumes(tmp_path: Path, s3_remote: str) -> None:
    import importlib.util

    import numpy as np

    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")

    env = run_env(KERAS_BACKEND="torch")
    script = str(EXAMPLES / "sagemaker_style_keras.py")
    base = run([PY, script, "--checkpoint-dir", str(tmp_path / "base"), "--epochs", "6",
                "--out", str(tmp_path / "base.weights.h5")], env=env)
    assert base.returncode == 0, base.stderr

    a = tmp_path / "instance-a"
    p = Proc(_run_argv(a, s3_remote, PY, script, "--checkpoint-dir", str(a), "--epochs", "6",
                       "--sleep", "0.8"), env=env)
    wait_until(lambda: (a / "model-epoch-003.keras").exists(), 60, "epoch 3 checkpoint")
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGTERM)
    assert p.finish(30) == 143, p.stderr
    assert {"model-epoch-001.keras", "model-epoch-002.keras", "model-epoch-003.keras"} <= set(remote_files(s3_remote))

    b = tmp_path / "instance-b"
    q = Proc(_run_argv(b, s3_remote, PY, script, "--checkpoint-dir", str(b), "--epochs", "6",
                       "--out", str(tmp_path / "final.weights.h5")), env=env)
    assert q.finish(60) == 0, q.stderr
    m = q.wait_for(r"resumed from model-epoch-(\d+)\.keras", 1)
    assert int(m.group(1)) >= 3
    got, want = _h5_weights(tmp_path / "final.weights.h5"), _h5_weights(tmp_path / "base.weights.h5")
    assert len(got) == len(want) > 0
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(got, want))


# -- a Checkpointer inside a supervised child ------------------------------------------------
@pytest.mark.slow
def test_supervised_checkpointer_commits_locally_supervisor_uploads(tmp_path: Path, s3_remote: str) -> None:
    script = str(EXAMPLES / "train_custom_loop.py")
    args = ["--steps", "240", "--every-steps", "20"]
    base = run([PY, script, *args, "--out", str(tmp_path / "base.pt")],
               env=run_env(SPOTCKPT_LOCAL_DIR=str(tmp_path / "base")))
    assert base.returncode == 0, base.stderr

    a = tmp_path / "instance-a"
    p = Proc(_run_argv(a, s3_remote, PY, script, *args, "--sleep", "0.03", "--out", str(tmp_path / "final.pt")),
             env=run_env())
    p.wait_for(r"^step 100 ", 60)
    sup = psutil.Process(p.pid)
    child = sup.children()[0]
    assert child.environ().get("SPOTCKPT_SUPERVISED") == "1"
    os.kill(p.pid, signal.SIGTERM)
    assert p.finish(30) == 143, p.stderr            # the Checkpointer's exit status, passed on
    ev = _events(a)
    notice = next(e for e in ev if e["event"] == "notice" and "step" in e)
    assert notice["pid"] == child.pid
    uploads = [e for e in ev if e["event"] == "upload_done"]
    assert uploads and {e["pid"] for e in uploads} == {p.pid}   # only the supervisor uploads
    store = RemoteStore(s3_remote)
    assert store.committed()[-1] == notice["step"]
    assert f"checkpoint step {notice['step']}" in p.stderr and "s left before the deadline" in p.stderr
    assert len(LocalDir(a).committed()) <= 2        # the supervisor applied keep_last after uploads
    assert any(e["event"] == "local_deleted" and e["pid"] == p.pid for e in ev)

    b = tmp_path / "instance-b"
    q = Proc(_run_argv(b, s3_remote, PY, script, *args, "--out", str(tmp_path / "final.pt")), env=run_env())
    assert q.finish(60) == 0, q.stderr
    q.wait_for(rf"resumed at step {notice['step']}$", 1)
    assert _tensors_equal(tmp_path / "final.pt", tmp_path / "base.pt")


# -- process tree, zombies, orphans, the deadline ------------------------------------------
RECORDER = """
import signal, sys, time
name = sys.argv[1]
def on_term(signum, frame):
    open(name + ".term", "w").write("1")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(name + ".ready", "w").write("1")
time.sleep(60)
"""


def test_sigterm_reaches_the_tree_behind_a_shell(tmp_path: Path) -> None:
    (tmp_path / "rec.py").write_text(RECORDER)
    cmd = f"{PY} rec.py A & {PY} rec.py B & wait"
    p = Proc(spotckpt("run", "--local-dir", str(tmp_path / "ck"), "--grace", "10", "--", "sh", "-c", cmd),
             env=run_env(), cwd=tmp_path)
    wait_until(lambda: (tmp_path / "A.ready").exists() and (tmp_path / "B.ready").exists(), 30, "recorders")
    os.kill(p.pid, signal.SIGTERM)
    rc = p.finish(20)
    assert (tmp_path / "A.term").exists() and (tmp_path / "B.term").exists()
    assert rc == 143, p.stderr                      # interrupted, though the recorders exit 0


def test_signal_targets_spare_children_of_python(tmp_path: Path) -> None:
    from spotckpt._supervisor import _proctree as pt

    inner = f"import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    proc = psutil.Popen(["sh", "-c", f"{PY} -c \"{inner}\" & sleep 30 & wait"])
    try:
        wait_until(lambda: len(proc.children(recursive=True)) >= 3, 20, "the tree")
        kids = proc.children(recursive=True)
        py = next(k for k in kids if k.name().startswith("python"))
        py_child = wait_until(lambda: py.children(), 10, "python's child")[0]
        auto = {x.pid for x in pt.targets(proc.pid, "auto")}
        assert proc.pid in auto and py.pid in auto and py_child.pid not in auto
        assert {x.pid for x in pt.targets(proc.pid, "tree")} >= {proc.pid, py.pid, py_child.pid}
        assert [x.pid for x in pt.targets(proc.pid, "child")] == [proc.pid]
    finally:
        for k in proc.children(recursive=True) + [proc]:
            try:
                k.kill()
            except psutil.Error:
                pass
        proc.wait()


def test_zombies_reaped_and_orphans_stopped(tmp_path: Path) -> None:
    pidfile = tmp_path / "orphan.pid"
    # (sleep 0.2 &) leaves an orphan that exits at once: a zombie unless someone reaps it.
    # The backgrounded sleep 300 outlives the command: it must not outlive the supervisor.
    cmd = f"(sleep 0.2 &); sleep 300 & echo $! > {pidfile}; sleep 2; exit 7"
    p = Proc(spotckpt("run", "--local-dir", str(tmp_path / "ck"), "--", "sh", "-c", cmd), env=run_env())
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "pidfile")
    time.sleep(1.0)
    sup = psutil.Process(p.pid)
    zombies = [c for c in sup.children(recursive=True) if c.status() == psutil.STATUS_ZOMBIE]
    assert not zombies
    assert p.finish(30) == 7, p.stderr              # the command's own status
    orphan = int(pidfile.read_text())
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE


def test_child_that_ignores_sigterm_is_killed_before_the_deadline(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    p = Proc(spotckpt("run", "--local-dir", str(tmp_path / "ck"), "--remote", f"file://{tmp_path}/remote/",
                      "--grace", "4", "--", PY, "-c", code), env=run_env())
    p.wait_for("^ready$", 30)
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    rc = p.finish(10)
    took = time.monotonic() - t0
    assert rc == 143, p.stderr                      # interrupted (the command's own status: 137)
    assert took < 4.0, took                         # out before the grace ends
    assert "killed it (SIGKILL)" in p.stderr
    assert next(e["status"] for e in _events(tmp_path / "ck") if e["event"] == "child_exit") == 137


@pytest.mark.slow
def test_bad_command_and_unreachable_remote_are_one_line_exit_2(tmp_path: Path, s3_env: dict) -> None:
    r = run(spotckpt("run", "--local-dir", str(tmp_path / "ck"), "--", "no-such-command-xyz"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "command not found" in r.stderr
    env = run_env(AWS_ENDPOINT_URL_S3="http://127.0.0.1:9")   # nothing listens there
    t0 = time.monotonic()
    r = run(spotckpt("run", "--local-dir", str(tmp_path / "ck"), "--remote", "s3://bucket/x/", "--", "true"),
            env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "s3://bucket/x/" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 20
