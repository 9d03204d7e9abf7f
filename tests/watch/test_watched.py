"""The watched dir: files a script writes itself reach the remote as committed, verified
file sets (issue 11), on file:// and on the S3 server (one contract).

Each test attacks one promise: a file rewritten while it uploads, a fast writer, a
directory checkpoint caught half written, a local delete, symlinks, mtimes, foreign
objects, a name that is not UTF-8, and a checkpoint queued behind a backlog of files.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from spotckpt._watch import _upload as _watch_upload
from spotckpt._watch import _watcher as _watch
from spotckpt._errors import RemoteNotFoundError
from spotckpt._watch._fileset import FileSet, list_files_prefix, newest_set, set_key
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import file_digest
from spotckpt._remote._store import RemoteStore
from spotckpt._sync._syncer import Syncer
from spotckpt._watch._watcher import Watcher
from spotckpt._watch._pull import restore_files


def remote_files(store: RemoteStore) -> dict:
    fs = newest_set(store)
    return {} if fs is None else fs.entries


def object_ok(store: RemoteStore, e, tmp: Path) -> bool:
    p = tmp / "check.bin"
    store.get_file(e.key, p)
    return p.stat().st_size == e.size and file_digest(p) == e.xxh3


def test_open_files_wait_closed_ones_go_at_once(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(remote_url)
    s = Syncer(LocalDir(root), store, keep_last=2, scan_interval=0.1)
    s.start()
    try:
        (root / "sub").mkdir()
        (root / "sub" / "model-epoch1.pt").write_bytes(b"a" * 1000)
        with open(root / "checkpoint.pth", "wb") as writer:
            writer.write(b"partial")
            writer.flush()
            assert s.flush(10)
            assert "sub/model-epoch1.pt" in remote_files(store)
            assert "checkpoint.pth" not in remote_files(store)  # open for writing: not yet
            writer.write(b" and the rest")
        assert s.flush(10)                                   # no stability wait once closed
        e = remote_files(store)["checkpoint.pth"]
        assert store.cat(e.key) == b"partial and the rest"
        n = s.bytes_uploaded
        assert s.flush(10)
        assert s.bytes_uploaded == n                         # an unchanged tree uploads nothing
        (root / ".x.tmp.sagemaker-ignore").mkdir()
        (root / ".x.tmp.sagemaker-ignore" / "f").write_bytes(b"x")
        assert s.flush(10)
        assert all(".sagemaker-ignore" not in p for p in remote_files(store))
    finally:
        s.close(5)


class _RewritingStore(RemoteStore):
    """Rewrites the file in place (same size) while its upload reads it: a torn read."""

    def __init__(self, url: str, victim: Path, new: bytes) -> None:
        super().__init__(url)
        self.victim, self.new, self.armed = victim, new, False

    def put_file(self, local, rel):  # type: ignore[override]
        if self.armed and Path(local) == self.victim:
            self.armed = False
            with open(self.victim, "r+b") as f:
                f.write(self.new[: len(self.new) // 2])  # half the new version over the old
        return super().put_file(local, rel)


def test_file_rewritten_while_uploading_never_replaces_the_complete_copy(
        tmp_path: Path, remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_watch, "_SMALL", 0)  # every file through the streaming path
    monkeypatch.setattr(_watch_upload, "_SMALL", 0)  # (_watcher groups by it, _upload reads by it)
    root = tmp_path / "ck"
    root.mkdir()
    f = root / "checkpoint.pth"
    v1, v2 = b"1" * 4096, b"2" * 4096
    f.write_bytes(v1)
    store = _RewritingStore(remote_url, f, v2)
    w = Watcher(LocalDir(root), store)
    w.run_pass()
    first = remote_files(store)["checkpoint.pth"]
    assert store.cat(first.key) == v1
    time.sleep(0.01)
    f.write_bytes(v1[:100] + b"x" + v1[101:])  # a new version, torn while it uploads
    store.armed = True
    w.run_pass()
    e = remote_files(store)["checkpoint.pth"]
    assert e == first and store.cat(e.key) == v1   # the set still names the complete copy
    keys = list_files_prefix(store)[1]
    assert keys == {first.key}                     # the torn attempt's object is gone
    w.run_pass()                                   # unchanged since: this version goes up
    e = remote_files(store)["checkpoint.pth"]
    assert store.cat(e.key) == f.read_bytes() and object_ok(store, e, tmp_path)


def test_fast_rewrites_do_not_starve(tmp_path: Path, remote_url: str) -> None:
    """A file rewritten every 50 ms (no quiet period at all) still reaches the remote, and
    every version the remote names is complete."""
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(remote_url)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            body = os.urandom(32 << 10)
            with open(root / "model.pt", "wb") as f:  # truncate + write: torn while open
                f.write(i.to_bytes(8, "big") + body + file_digest_bytes(body))
            i += 1
            time.sleep(0.05)

    t = threading.Thread(target=writer)
    t.start()
    s = Syncer(LocalDir(root), store, keep_last=2, scan_interval=0.05)
    s.start()
    seen = set()
    try:
        end = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < end:
            s.flush(10)
            e = remote_files(store).get("model.pt")
            if e is not None:
                try:
                    data = store.cat(e.key)
                except RemoteNotFoundError:
                    continue  # superseded while read: its object is gone, read the newer set
                assert data[-16:] == file_digest_bytes(data[8:-16]), "a torn version was committed"
                seen.add(int.from_bytes(data[:8], "big"))
    finally:
        stop.set()
        t.join()
        s.close(5)
    assert len(seen) >= 3, seen


def file_digest_bytes(b: bytes) -> bytes:
    import xxhash

    return xxhash.xxh3_128(b).digest()


def test_directory_checkpoint_is_one_unit(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    (root / "checkpoint-10").mkdir(parents=True)
    (root / "checkpoint-10" / "model.safetensors").write_bytes(b"m" * 5000)
    (root / "checkpoint-10" / "optimizer.pt").write_bytes(b"o" * 3000)
    store = RemoteStore(remote_url)
    w = Watcher(LocalDir(root), store)
    w.run_pass()
    assert not any(p.startswith("checkpoint-10/") for p in remote_files(store))  # no marker yet
    (root / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (root / "checkpoint-10" / "rng_state.pth").write_bytes(b"r" * 100)
    w.run_pass()
    got = {p: e for p, e in remote_files(store).items() if p.startswith("checkpoint-10/")}
    assert len(got) == 4 and {e.unit for e in got.values()} == {"checkpoint-10"}
    assert len({e.key.split("/")[1] for e in got.values()}) == 1   # one version id for the unit

    # restore on an empty dir: whole; with one object damaged: not at all
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    restore_files(LocalDir(fresh), store)
    assert sorted(os.listdir(fresh / "checkpoint-10")) == sorted(p.split("/")[1] for p in got)
    store.put_data(got["checkpoint-10/optimizer.pt"].key, b"o" * 2999 + b"X")
    broken = tmp_path / "broken"
    broken.mkdir()
    restore_files(LocalDir(broken), store)
    assert not (broken / "checkpoint-10").exists()


def test_local_deletes_reach_the_remote(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(remote_url)
    w = Watcher(LocalDir(root), store)
    for i in range(5):  # a script keeping the newest two, as save_total_limit=2 does
        (root / f"epoch-{i}.pt").write_bytes(os.urandom(1000))
        if i >= 2:
            os.unlink(root / f"epoch-{i - 2}.pt")
        w.run_pass()
    assert sorted(remote_files(store)) == ["epoch-3.pt", "epoch-4.pt"]
    sets, objects = list_files_prefix(store)
    assert len(sets) == 1 and len(objects) == 2   # nothing else left behind


def test_symlinks_and_mtimes_come_back(tmp_path: Path, remote_url: str, caplog) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    for i, t in ((4, 1_600_000_000), (5, 1_600_000_100)):
        (root / f"epoch-{i}.pt").write_bytes(b"e" * (100 + i))
        os.utime(root / f"epoch-{i}.pt", ns=(t * 10**9 + 123, t * 10**9 + 123))
    os.symlink("epoch-5.pt", root / "latest.pt")
    os.symlink("/etc/hostname", root / "outside.pt")
    store = RemoteStore(remote_url)
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        Watcher(LocalDir(root), store).run_pass()
    assert "outside.pt" in caplog.text and "outside" not in remote_files(store)
    assert remote_files(store)["latest.pt"].link == "epoch-5.pt"

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    restore_files(LocalDir(fresh), store)
    assert os.readlink(fresh / "latest.pt") == "epoch-5.pt"
    assert (fresh / "latest.pt").read_bytes() == b"e" * 105
    for i in (4, 5):
        assert (fresh / f"epoch-{i}.pt").stat().st_mtime_ns == (root / f"epoch-{i}.pt").stat().st_mtime_ns
    newest = max(os.listdir(fresh), key=lambda n: (fresh / n).stat().st_mtime)
    assert newest in ("epoch-5.pt", "latest.pt")

    # a set naming a link out of the dir (hostile or old) is refused, never followed
    fs = newest_set(store)
    evil = dict(fs.entries)
    evil["escape.pt"] = type(fs.entries["latest.pt"])(path="escape.pt", link="../../etc/passwd")
    store.put_data(set_key(fs.seq + 1), FileSet(seq=fs.seq + 1, entries=evil).to_json())
    other = tmp_path / "other"
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        restore_files(LocalDir(other), store)
    assert not os.path.lexists(other / "escape.pt") and "escape.pt" in caplog.text


def test_undecodable_name_is_skipped_not_fatal(tmp_path: Path, remote_url: str, caplog) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    (root / "good.pt").write_bytes(b"g")
    with open(os.path.join(os.fsencode(root), b"bad\xff.pt"), "wb") as f:
        f.write(b"b")
    store = RemoteStore(remote_url)
    s = Syncer(LocalDir(root), store, keep_last=2, scan_interval=0.1)
    s.start()
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        assert s.flush(10)
        assert s.close(5)
    assert list(remote_files(store)) == ["good.pt"]
    assert "not valid UTF-8" in caplog.text


def test_foreign_objects_are_named_and_skipped(tmp_path: Path, s3_server, s3_remote: str, caplog) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    (root / "model.pt").write_bytes(b"m" * 10)
    store = RemoteStore(s3_remote)
    Watcher(LocalDir(root), store).run_pass()
    bucket = s3_remote.split("/")[2]
    c = s3_server.client()
    for key in ("run/a//b.pt", "run/exports/", "run/out", "run/out/model.pt"):
        c.put_object(Bucket=bucket, Key=key, Body=b"x")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        fs, got, _ = restore_files(LocalDir(fresh), RemoteStore(s3_remote))
    assert got == ["model.pt"] and sorted(os.listdir(fresh)) == ["model.pt"]
    line = [r.message for r in caplog.records if "not spotckpt's" in r.message]
    assert len(line) == 1 and all(k in line[0] for k in ("a//b.pt", "exports/", "'out'", "out/model.pt"))


@pytest.mark.slow
def test_a_checkpoint_is_not_queued_behind_a_backlog_of_files(tmp_path: Path, s3_remote: str) -> None:
    root = tmp_path / "ck"
    (root / "logs").mkdir(parents=True)
    for i in range(1500):
        (root / "logs" / f"f{i:05d}.txt").write_bytes(b"x" * 64)
    local = LocalDir(root)
    store = RemoteStore(s3_remote)
    events = tmp_path / "events.jsonl"
    from spotckpt._events import EventLog
    from spotckpt._commit._manifest import FileEntry, build_manifest

    s = Syncer(local, store, keep_last=2, events=EventLog(events), scan_interval=0.05)
    s.start()
    try:
        deadline = time.monotonic() + 60
        while not (events.exists() and "mirror_upload" in events.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        tmp = local.begin(7)
        (tmp / "state.pt").write_bytes(b"s" * 100)
        local.commit(tmp, build_manifest(7, [FileEntry("state.pt", 100, file_digest(tmp / "state.pt"))],
                                         framework="test", serializer="raw"))
        s.submit(7)
        assert s.wait_durable(7, 60)
        assert s.flush(120)
    finally:
        s.close(5)
    ev = [json.loads(x) for x in events.read_text().splitlines()]
    done = next(i for i, e in enumerate(ev) if e["event"] == "upload_done")
    files_after = sum(e.get("files", 1) for e in ev[done:] if e["event"] == "mirror_upload")
    assert files_after > 0, "the checkpoint waited for the whole backlog"
    assert len(remote_files(store)) == 1500


def test_verify_checks_the_committed_files(tmp_path: Path, remote_url: str) -> None:
    from proc_helpers import run, spotckpt

    root = tmp_path / "ck"
    root.mkdir()
    (root / "model.pt").write_bytes(b"m" * 1000)
    store = RemoteStore(remote_url)
    Watcher(LocalDir(root), store).run_pass()
    argv = spotckpt("verify", "--local-dir", str(tmp_path / "empty"), "--remote", remote_url, "--json")
    ok = run(argv)
    assert ok.returncode == 0, ok.stderr
    assert [r["file"] for r in json.loads(ok.stdout)["checked"]] == ["model.pt"]
    store.put_data(remote_files(store)["model.pt"].key, b"m" * 999 + b"X")
    bad = run(argv)
    assert bad.returncode == 1 and "model.pt: fails its checksum" in bad.stdout


def test_a_start_without_pull_deletes_nothing_it_never_saw(tmp_path: Path, remote_url: str) -> None:
    """`spotckpt run --no-pull` (or a file refused as damaged at the pull) on an empty dir:
    the committed files stay; only what this run saw and then lost is deleted."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "keep.pt").write_bytes(b"k")
    (a / "gone.pt").write_bytes(b"g")
    store = RemoteStore(remote_url)
    Watcher(LocalDir(a), store).run_pass()
    b = tmp_path / "b"
    b.mkdir()
    w = Watcher(LocalDir(b), store)
    w.run_pass()
    assert sorted(remote_files(store)) == ["gone.pt", "keep.pt"]
    (b / "gone.pt").write_bytes(b"g2")
    w.run_pass()
    os.unlink(b / "gone.pt")
    w.run_pass()
    assert sorted(remote_files(store)) == ["keep.pt"]


def test_a_writer_that_opened_the_file_after_the_check_is_caught(tmp_path: Path, remote_url: str) -> None:
    """The pass checks for writers before it reads; a writer that opens the file between
    that check and the read and then stalls (a slow save) would leave a partial file that
    looks unchanged over the read. The check after the upload catches it."""
    root = tmp_path / "ck"
    root.mkdir()
    calls = []

    def busy(paths: set[str]) -> set[str]:
        calls.append(paths)
        return set() if len(calls) == 1 else _watch.open_for_writing(paths)  # the first check misses it

    store = RemoteStore(remote_url)
    with open(root / "model.pt", "wb") as f:
        f.write(b"half of a save")
        f.flush()
        Watcher(LocalDir(root), store, busy=busy).run_pass()
        assert "model.pt" not in remote_files(store) and len(calls) == 2
    assert list_files_prefix(store)[1] == set()   # its object was deleted again


def test_a_write_begun_after_the_check_and_ended_before_the_recheck_is_caught(tmp_path: Path) -> None:
    """A ``write()`` sets the file's times when it begins, then copies its bytes. A writer that
    opened the file after the pass's writers check and began one long ``write()`` before the
    read's first ``stat`` gave a read half new, half old, with the same signature before and
    after it; by the check after the upload the writer had closed, and that mix was
    committed (the watched-dir chaos test caught one under load: an in-place rewrite). The
    read's signature must be the one the scan took before the writers check."""
    root = tmp_path / "ck"
    root.mkdir()
    n = 256 << 20
    f = root / "state.bin"
    f.write_bytes(b"\x01" * n)
    new = b"\x02" * n
    writer: list[threading.Thread] = []

    def rewrite() -> None:
        fd = os.open(f, os.O_WRONLY)
        try:
            os.pwrite(fd, new, 0)  # one write: its times are set before its bytes are copied
        finally:
            os.close(fd)

    def busy(paths: set[str]) -> set[str]:
        if not writer:  # the check before the reads: nobody writes yet; then the writer opens
            writer.append(threading.Thread(target=rewrite, daemon=True))
            writer[0].start()
            fd = os.open(f, os.O_RDONLY)
            try:
                while os.pread(fd, 1, 0) != b"\x02":  # its write has begun
                    pass
            finally:
                os.close(fd)
            return set()
        writer[0].join(60)  # the check after the upload: the writer has closed by then
        return _watch.open_for_writing(paths)

    store = RemoteStore(f"file://{tmp_path / 'remote'}/")
    w = Watcher(LocalDir(root), store, busy=busy)
    w.run_pass()
    writer[0].join(60)
    for _ in range(3):  # the next passes commit the whole new version
        w.run_pass()
    e = remote_files(store)["state.bin"]
    data = store.cat(e.key)
    assert set(data[::1 << 16]) == {2} and file_digest(f) == e.xxh3, "a version mixed from two writes was committed"
