"""The watched dir under `spotckpt run`, attacked with real processes and signals (issue 11,
finding 1): a command killed while it rewrites its file in place must never get that torn
file onto the remote, not at the final flush, not through the supervisor's poll racing the
child's exit, and not through the next `spotckpt run` on the same dir."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import xxhash

from conftest import remote_files, run_env
from proc_helpers import PY, Proc, run, spotckpt, wait_until
from spotckpt._errors import RemoteNotFoundError
from spotckpt._remote._store import RemoteStore

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

SCRIPT = str(Path(__file__).parents[1] / "scripts" / "inplace_writer.py")


def remote_version(remote: str) -> int:
    """The committed checkpoint.pth's counter; fails if the committed copy is not whole.
    (A set superseded while it is read has its objects deleted by the running job: read the
    newer one.)"""
    for _ in range(20):
        e = remote_files(remote)["checkpoint.pth"]
        try:
            data = RemoteStore(remote).cat(e.key)
        except RemoteNotFoundError:
            continue
        assert len(data) == e.size and xxhash.xxh3_128(data[:-16]).digest() == data[-16:], "torn remote copy"
        return int.from_bytes(data[:8], "big")
    raise AssertionError("the committed set kept changing under the reader")


def start(local: Path, remote: str, trigger: Path) -> Proc:
    return Proc(spotckpt("run", "--local-dir", str(local), "--remote", remote, "--grace", "20",
                         "--scan-interval", "0.1", "--", PY, SCRIPT, str(local), str(trigger)), env=run_env())


@pytest.mark.parametrize("who", ["child", "tree"])
def test_file_torn_by_a_kill_never_reaches_the_remote(tmp_path: Path, s3_remote: str, who: str) -> None:
    local = tmp_path / "ck"
    for trial in range(3):
        trigger = tmp_path / f"go-{trial}"
        p = start(local, s3_remote, trigger)
        m = p.wait_for(r"pid (\d+) saved version (\d+)", 60)
        pid, saved = int(m.group(1)), int(m.group(2))
        wait_until(lambda: "checkpoint.pth" in remote_files(s3_remote)
                   and remote_version(s3_remote) == saved, 60, "version committed")
        trigger.touch()
        p.wait_for("half written", 30)
        if who == "child":
            os.kill(pid, signal.SIGKILL)        # the command dies; the supervisor does the final flush
            assert p.finish(30) == 128 + signal.SIGKILL, p.stderr
        else:                                   # the whole machine goes: supervisor included
            procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            for q in procs:
                q.kill()
            p.finish(30)
        assert remote_version(s3_remote) == saved   # the complete copy, never the torn one
    # The next run on the same dir puts the committed version back in place of the torn
    # file (which is kept aside) and never uploads the torn one.
    done = run(spotckpt("run", "--local-dir", str(local), "--remote", s3_remote, "--",
                        PY, "-c", "pass"), env=run_env())
    assert done.returncode == 0, done.stderr
    assert "may be torn" in done.stderr
    assert remote_version(s3_remote) == saved
    data = (local / "checkpoint.pth").read_bytes()
    assert xxhash.xxh3_128(data[:-16]).digest() == data[-16:]


def test_a_command_in_the_middle_of_its_exit_is_no_sign_of_life() -> None:
    """The race behind a torn file reaching the remote (seen once under a load average of
    20): SIGKILL closes the command's files (torn) inside its exit, and until the exit ends
    ``waitpid`` still reports it running, so a poll in that window confirmed "alive" and
    the watcher admitted the torn version. A thread-group leader that exits while another
    thread runs stays in that state (exited, its threads' files open, not reapable):
    ``dying`` must see it, and a plain running process must not be."""
    import subprocess
    import sys

    from spotckpt._supervisor import _proctree as pt
    code = ("import ctypes, threading, time\n"
            "threading.Thread(target=time.sleep, args=(120,), daemon=True).start()\n"
            "print('ready', flush=True)\n"
            "ctypes.CDLL(None).syscall(60, 0)\n")  # SYS_exit: this thread only, not the group
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    plain = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout.readline().strip() == "ready" and plain.stdout.readline().strip() == "ready"
        wait_until(lambda: pt.dying(pt.tree(leader.pid), leader.pid), 30, "the leader's exit")
        assert leader.poll() is None  # waitpid: still running
        assert not pt.dying(pt.tree(plain.pid), plain.pid)
    finally:
        for p in (leader, plain):
            p.kill()
            p.wait(30)
