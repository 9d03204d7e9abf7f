"""A file a script closes in the watched dir starts uploading at once (inotify), not at the
next periodic scan; the scan stays as the fallback (no inotify, the watch limit hit, events
lost to ``IN_Q_OVERFLOW``). What a pass uploads is judged as before: events only make it
come sooner (the torn-file, stale-file, rules and file-set suites run unchanged)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore
from spotckpt._sync._syncer import Syncer
from spotckpt._watch import Changes
from spotckpt._watch._fileset import newest_set

linux_inotify = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify: Linux only")


def _committed(store: RemoteStore, rel: str, timeout: float) -> float | None:
    """Seconds until ``rel`` is in the newest set, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        fs = newest_set(store)
        if fs is not None and rel in fs.entries:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _started(tmp_path: Path, scan_interval: float) -> tuple[Path, RemoteStore, Syncer]:
    root = tmp_path / "ck"
    root.mkdir()
    (root / "seed.txt").write_text("seed")
    store = RemoteStore(f"file://{tmp_path / 'remote'}/")
    s = Syncer(LocalDir(root), store, keep_last=2, scan_interval=scan_interval)
    s.start()
    assert s.flush(120) and _committed(store, "seed.txt", 1) is not None  # a first pass is done
    return root, store, s


@linux_inotify
@pytest.mark.parametrize("where", ["model.pt", "new/sub/dir/model.pt"])
def test_a_closed_file_is_committed_without_waiting_for_the_scan(tmp_path: Path, where: str) -> None:
    # The scan comes every 600 s here: only the close itself can start the upload.
    root, store, s = _started(tmp_path, 600.0)
    try:
        (root / where).parent.mkdir(parents=True, exist_ok=True)  # (new dirs: watched as they appear)
        with open(root / where, "wb") as f:
            f.write(os.urandom(1 << 16))
        took = _committed(store, where, 60)
        assert took is not None, "a closed file waited for the periodic scan"
        assert s._changes is not None and s._changes.ok, s._changes.why
        # renamed into place (torch.save to a temp name, then os.replace: Lightning, HF)
        tmp = root / "new" / ".staging"
        tmp.parent.mkdir(exist_ok=True)
        tmp.write_bytes(b"y" * 100)
        os.replace(tmp, root / "renamed.pt")
        assert _committed(store, "renamed.pt", 60) is not None, "a file moved in waited for the scan"
    finally:
        s.close(30)


def test_without_inotify_the_periodic_scan_commits(tmp_path: Path) -> None:
    """inotify_simple not importable (another OS, not installed): the scan, as before."""
    code = f"""
import sys, time, os
sys.modules["inotify_simple"] = None
from pathlib import Path
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore
from spotckpt._sync._syncer import Syncer
from spotckpt._watch._fileset import newest_set
root = Path({str(tmp_path / 'ck')!r}); root.mkdir()
store = RemoteStore("file://{tmp_path / 'remote'}/")
s = Syncer(LocalDir(root), store, keep_last=2, scan_interval=0.3); s.start()
assert s._changes is not None and not s._changes.ok and "inotify" in s._changes.why, s._changes.why
(root / "a.txt").write_text("a")
end = time.monotonic() + 60
while not ((fs := newest_set(store)) and "a.txt" in fs.entries):
    assert time.monotonic() < end, "never committed"
    time.sleep(0.05)
assert s.close(30)
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


@linux_inotify
def test_the_watch_limit_hit_means_the_scan(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"d{i}").mkdir()
    c = Changes(tmp_path, lambda: None, max_watches=2)
    try:
        assert not c.ok and "watch limit" in c.why
    finally:
        c.close()


@linux_inotify
def test_events_lost_to_an_overflow_ask_for_a_full_pass(tmp_path: Path) -> None:
    """More events than the kernel queues (fs.inotify.max_queued_events) while the reader is
    held: the reader sees IN_Q_OVERFLOW and asks for a pass (which scans the whole dir)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 40_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it here")
    hold, calls = threading.Event(), []

    def on_change() -> None:
        calls.append(time.monotonic())
        hold.wait(120)

    (tmp_path / "first").write_text("x")
    c = Changes(tmp_path, on_change)
    try:
        assert c.ok, c.why
        t0 = time.monotonic()
        while not calls:  # the reader is now held inside on_change
            assert time.monotonic() - t0 < 60
            (tmp_path / "first").write_text("x")
            time.sleep(0.01)
        for i in range(limit // 2 + 100):  # CREATE + CLOSE_WRITE each: past the queue's size
            with open(tmp_path / f"f{i}", "wb"):
                pass
        n = len(calls)
        hold.set()
        t0 = time.monotonic()
        while c.overflows == 0 or len(calls) <= n:
            assert time.monotonic() - t0 < 60, "the overflow was never reported"
            time.sleep(0.02)
    finally:
        hold.set()
        c.close()
