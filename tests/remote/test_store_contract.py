"""One behaviour contract for the remote store, run on file:// and on the S3 server."""
from __future__ import annotations

from pathlib import Path

import pytest

from spotckpt._errors import CorruptCheckpointError, RemoteError
from spotckpt._commit._manifest import FileEntry, build_manifest, step_dirname
from spotckpt._remote._store import RemoteStore


def test_probe_put_get_size(remote_url: str, tmp_path: Path) -> None:
    store = RemoteStore(remote_url)
    store.probe()
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 12345)
    assert store.put_file(src, "a/b/c.bin") == 12345
    assert store.size("a/b/c.bin") == 12345
    assert store.exists("a/b/c.bin")
    dst = tmp_path / "dst.bin"
    store.get_file("a/b/c.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert store.find() == {"a/b/c.bin": 12345}  # the probe object is gone


def test_put_bytes_overwrites(remote_url: str) -> None:
    store = RemoteStore(remote_url)
    store.put_bytes("k", b"one")
    store.put_bytes("k", b"two")
    assert store.cat("k") == b"two"
    assert list(store.find()) == ["k"]


def test_committed_lists_only_checkpoints_with_manifest(remote_url: str) -> None:
    store = RemoteStore(remote_url)
    assert store.committed() == []
    for step in (5, 10, 20):
        store.put_bytes(f"{step_dirname(step)}/state.pt", b"payload")
    m = build_manifest(10, [FileEntry("state.pt", 7, "0" * 32)], framework="t", serializer="torch")
    store.put_bytes(f"{step_dirname(10)}/MANIFEST.json", m.to_json())
    assert store.committed() == [10]
    assert store.read_manifest(10).step == 10


def test_delete_and_quarantine(remote_url: str) -> None:
    store = RemoteStore(remote_url)
    for step in (1, 2):
        m = build_manifest(step, [FileEntry("state.pt", 1, "0" * 32)], framework="t", serializer="torch")
        store.put_bytes(f"{step_dirname(step)}/state.pt", b"p")
        store.put_bytes(f"{step_dirname(step)}/MANIFEST.json", m.to_json())
    assert store.committed() == [1, 2]
    store.delete_checkpoint(1)
    assert store.committed() == [2]
    assert not any(k.startswith(step_dirname(1)) for k in store.find())
    store.quarantine(2)
    assert store.committed() == []
    keys = store.find()
    assert f"{step_dirname(2)}/state.pt" in keys  # quarantined, not deleted
    assert f"{step_dirname(2)}/MANIFEST.json.quarantined" in keys


def test_manifest_with_wrong_step_is_rejected(remote_url: str) -> None:
    store = RemoteStore(remote_url)
    m = build_manifest(3, [], framework="t", serializer="torch")
    store.put_bytes(f"{step_dirname(4)}/MANIFEST.json", m.to_json())
    with pytest.raises(CorruptCheckpointError):
        store.read_manifest(4)


def test_missing_object_is_a_clear_error(remote_url: str, tmp_path: Path) -> None:
    store = RemoteStore(remote_url, attempts=2, base_delay=0.01)
    with pytest.raises(RemoteError) as ei:
        store.get_file("nope/missing.bin", tmp_path / "x")
    assert isinstance(ei.value, FileNotFoundError)
    assert remote_url in str(ei.value) and "\n" not in str(ei.value)


def test_multipart_sized_file_round_trips(remote_url: str, tmp_path: Path) -> None:
    """A file over one part goes up in parts (s3transfer's upload, and the stream that follows
    a writer), comes back byte for byte through the ranged download, and its size is
    confirmed by HEAD: RGW answers CompleteMultipartUpload with an empty ETag and echoes no
    CRC32, so nothing may rely on either."""
    import os

    from spotckpt._remote._s3fast import PART_SIZE

    store = RemoteStore(remote_url)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(PART_SIZE + (1 << 20)))
    want = src.stat().st_size
    assert store.put_file(src, "big/a.bin") == want
    streamed = tmp_path / "streamed.bin"
    with open(streamed, "wb") as f:
        up = store.stream_file(streamed, "big/s.bin")  # None on file://
        f.write(src.read_bytes())
    if up is not None:
        up.finish(want)
        assert up.wait(120), up.error
    assert store.put_file(streamed, "big/s.bin") == want
    assert store.find("big") == {"big/a.bin": want, "big/s.bin": want}
    for rel in ("big/a.bin", "big/s.bin"):
        dst = tmp_path / "back.bin"
        store.get_file(rel, dst)
        assert dst.read_bytes() == src.read_bytes(), rel
