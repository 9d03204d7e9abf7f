"""The watched dir attacked where a review found holes (issue 11): a writer that stalls
mid-save and is then killed, a restart that does not pull, a directory checkpoint
rewritten in place or deleted file by file, an unreadable dir, a file swapped for a FIFO.
Each fails on the code before its fix."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spotckpt._watch import _scan as _watchscan
from spotckpt._watch._closed import open_for_writing
from spotckpt._watch._fileset import newest_set
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore
from spotckpt._watch._watcher import Watcher
from spotckpt._watch._pull import restore_files

STALL = "import sys, time\nf = open(sys.argv[1], 'r+b')\nf.write(b'B' * 500)\nf.flush()\nprint('ok', flush=True)\ntime.sleep(100)\n"


def committed(store: RemoteStore) -> dict[str, bytes]:
    fs = newest_set(store)
    return {} if fs is None else {p: store.cat(e.key) for p, e in fs.entries.items() if e.link is None}


def stalled_then_killed(root: Path, local: LocalDir, store: RemoteStore) -> None:
    """v1 committed; a writer rewrites half of it in place and stalls well past a heartbeat
    interval (the watcher keeps passing and beating); then it is SIGKILLed with everything."""
    (root / "model.pt").write_bytes(b"A" * 1000)
    w = Watcher(local, store, interval=0.2)
    w.run_pass()
    wr = subprocess.Popen([sys.executable, "-c", STALL, str(root / "model.pt")], stdout=subprocess.PIPE)
    try:
        assert wr.stdout is not None and wr.stdout.readline() == b"ok\n"
        for _ in range(8):  # 1.6 s of stall: more than the heartbeat interval plus its slop
            w.run_pass()
            time.sleep(0.2)
        assert committed(store) == {"model.pt": b"A" * 1000}
    finally:
        wr.kill()
        wr.wait()


@pytest.mark.parametrize("pull", [True, False])
def test_a_stalled_writer_killed_mid_save_is_never_committed_by_the_next_run(
        tmp_path: Path, remote_url: str, pull: bool) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    local, store = LocalDir(root), RemoteStore(remote_url)
    stalled_then_killed(root, local, store)
    if pull:  # `spotckpt run` on the same dir: the committed version comes back
        restore_files(local, store)
        assert (root / "model.pt").read_bytes() == b"A" * 1000
    w2 = Watcher(local, store)  # --no-pull, or an in-process Checkpointer after its restore
    w2.run_pass()
    assert committed(store) == {"model.pt": b"A" * 1000}
    if not pull:
        time.sleep(0.01)
        (root / "model.pt").write_bytes(b"C" * 1000)  # a new complete version is judged as usual
        w2.run_pass()
        assert committed(store) == {"model.pt": b"C" * 1000}


def test_a_directory_checkpoint_rewritten_in_place_or_deleted_keeps_its_committed_version(
        tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    u = root / "last.ckpt"                   # Lightning's sharded checkpoint: meta.pt last
    u.mkdir(parents=True)
    store = RemoteStore(remote_url)
    w = Watcher(LocalDir(root), store)
    (u / "__0_0.distcp").write_bytes(b"weights-v1")
    (u / "meta.pt").write_bytes(b"step=100")
    w.run_pass()
    v1 = {"last.ckpt/__0_0.distcp": b"weights-v1", "last.ckpt/meta.pt": b"step=100"}
    assert committed(store) == v1
    time.sleep(0.05)
    (u / "__0_0.distcp").write_bytes(b"weights-v2")   # the next save, before its marker
    w.run_pass()
    assert committed(store) == v1
    time.sleep(0.05)
    (u / "meta.pt").write_bytes(b"step=200")
    w.run_pass()
    v2 = {"last.ckpt/__0_0.distcp": b"weights-v2", "last.ckpt/meta.pt": b"step=200"}
    assert committed(store) == v2
    os.unlink(u / "__0_0.distcp")                     # rotation removes it file by file
    w.run_pass()
    assert committed(store) == v2
    os.unlink(u / "meta.pt")
    os.rmdir(u)
    w.run_pass()
    assert committed(store) == {}


def test_an_unreadable_dir_is_unknown_not_deleted(tmp_path: Path, remote_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ck"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "best.pt").write_bytes(b"best")
    (root / "last.pt").write_bytes(b"last")
    store = RemoteStore(remote_url)
    w = Watcher(LocalDir(root), store)
    w.run_pass()
    real = os.scandir

    def scandir(path):  # as for a dir of mode 000 to a process without CAP_DAC_OVERRIDE
        if str(path).endswith("/runs"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(_watchscan.os, "scandir", scandir)
    (root / "last.pt").write_bytes(b"last v2")
    w.run_pass()
    assert committed(store) == {"runs/best.pt": b"best", "last.pt": b"last v2"}


def test_a_file_swapped_for_a_fifo_does_not_hang_the_mirror(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    (root / "out.log").write_bytes(b"x")

    def busy(paths: set[str]) -> set[str]:  # runs between the scan and the read
        if (root / "out.log").is_file() and not (root / "out.log").is_fifo():
            os.unlink(root / "out.log")
            os.mkfifo(root / "out.log")
            os.utime(root / "out.log", (1e9, 1e9))
        return open_for_writing(paths)

    w = Watcher(LocalDir(root), RemoteStore(f"file://{tmp_path}/remote/"), busy=busy)
    t = threading.Thread(target=w.run_pass, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the pass hung on the FIFO"
