"""A file a writer opens right after the watcher's check that it is closed.

The watcher uploads a file only when no process holds it open for writing. Checked before
the read only, a writer that opened (truncated) the file just after that check and wrote
part of it before stalling left a version that looked closed and unchanged over the read:
the partial file was committed and the complete previous version deleted. Seen under load
in bench/ row 8 (a 256 MiB ``torch.save`` committed as a few MiB). The check after the read
catches it; here the writer's open is placed in that window deterministically.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from spotckpt._watch import _closed
from spotckpt._watch import _watcher as _watch
from spotckpt._watch._fileset import newest_set
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore
from spotckpt._watch._watcher import Watcher


def test_a_writer_opening_the_file_after_the_check_never_gets_its_partial_file_committed(
        tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    (root / "checkpoint.pth").write_bytes(b"epoch-1 " * 1000)
    store = RemoteStore(remote_url)
    w = Watcher(LocalDir(root), store)
    w.run_pass()
    first = newest_set(store).entries["checkpoint.pth"]

    (root / "checkpoint.pth").write_bytes(b"epoch-2 " * 1000)  # closed: this pass uploads it
    writer = []

    def busy_then_writer_opens(paths: set[str]) -> set[str]:
        found = _watch.open_for_writing(paths)
        if not writer:  # epoch 3's save starts right after the check, writes a little, stalls
            f = open(root / "checkpoint.pth", "wb")
            f.write(b"epoch-3 partial")
            f.flush()
            writer.append(f)
        return found

    w.busy = busy_then_writer_opens
    try:
        w.run_pass()
        e = newest_set(store).entries["checkpoint.pth"]
        assert e == first and store.cat(e.key) == b"epoch-1 " * 1000, "a partial file was committed"
        # The writer finishes and closes: the next pass commits the complete file.
        writer[0].write(b" and the rest")
        writer[0].close()
        w.busy = _watch.open_for_writing
        w.run_pass()
        e = newest_set(store).entries["checkpoint.pth"]
        assert store.cat(e.key) == b"epoch-3 partial and the rest"
        assert e.size == os.path.getsize(root / "checkpoint.pth")
    finally:
        for f in writer:
            f.close()


def test_a_file_being_truncated_by_open_is_never_committed_empty(tmp_path: Path, remote_url: str) -> None:
    """``open(path, "wb")`` empties the file before the opener holds it: while the kernel
    frees its cached pages (0.1-0.3 s per GiB here) it is empty, held by nobody, and its
    ``st_blocks`` not yet 0. A 1 GiB ``torch.save`` in place was committed as 0 bytes over the
    previous complete version that way (bench/ row 8). Here the pass sees the file at that
    moment: its ``os.stat`` answers what it answered then."""
    root = tmp_path / "ck"
    root.mkdir()
    (root / "model.pt").write_bytes(b"w" * 100_000)
    store = RemoteStore(remote_url)
    w = Watcher(LocalDir(root), store)
    w.run_pass()
    first = newest_set(store).entries["model.pt"]
    os.truncate(root / "model.pt", 0)  # the writer's open(O_TRUNC), caught midway:
    real_stat = os.stat

    def mid_truncation(path, *a, **kw):  # size 0, blocks still being freed
        st = real_stat(path, *a, **kw)
        if str(path).endswith("model.pt") and st.st_size == 0:
            vals = list(st)
            return type(st)(vals, {"st_blocks": 2048, "st_mtime_ns": st.st_mtime_ns,
                                   "st_ctime_ns": st.st_ctime_ns, "st_atime_ns": st.st_atime_ns})
        return st

    _watch.os.stat = mid_truncation
    try:
        w.run_pass()
    finally:
        _watch.os.stat = real_stat
    assert newest_set(store).entries["model.pt"] == first, "committed while being truncated"
    # The truncation is over (blocks 0) but the open has not returned yet: just emptied.
    # "Just" is SETTLE_NS after the truncation; a pass on a loaded machine may start later
    # than that, so the window is widened here rather than raced (it failed at load 12).
    settle = _closed.SETTLE_NS
    _closed.SETTLE_NS = 3600 * 1_000_000_000
    try:
        w.run_pass()
    finally:
        _closed.SETTLE_NS = settle
    assert newest_set(store).entries["model.pt"] == first, "committed a file emptied just now"
    # An empty file that stays empty and closed is a real version: it goes up once settled.
    old = time.time_ns() - 5_000_000_000
    os.utime(root / "model.pt", ns=(old, old))
    w.run_pass()
    assert newest_set(store).entries["model.pt"].size == 0
