"""The commit protocol, verified restore and retention, on file:// and on the S3 server."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import spotckpt
from spotckpt._commit._local import STEP_MARKER, LocalDir
from spotckpt._commit._manifest import MANIFEST, step_dirname
from spotckpt._remote._store import RemoteStore
from spotckpt._state._tensorfile import NAME as PAYLOAD


class Counter:
    """A user object with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n = sd["n"]


def train(local: Path, remote: str | None, total: int, *, every: int = 5, keep_last: int = 2,
          stop_after: int | None = None, flush_each: bool = False) -> tuple[Counter, spotckpt.Checkpointer]:
    c = Counter()
    w = torch.zeros(3)
    state = {"counter": c, "w": w, "tag": "x"}
    with spotckpt.Checkpointer(state, local_dir=local, remote=remote, every_steps=every,
                               keep_last=keep_last) as ckpt:
        for step in ckpt.steps(total):
            c.n += 1
            state["w"] = state["w"] + step
            if flush_each:
                assert ckpt.flush(30)
            if stop_after is not None and step + 1 == stop_after:
                break
    return c, ckpt


def test_resume_from_remote_with_empty_local_dir(tmp_path: Path, remote_url: str) -> None:
    c, ckpt = train(tmp_path / "a", remote_url, 12, flush_each=True)
    assert ckpt.restored_step is None and c.n == 12
    assert RemoteStore(remote_url).committed() == [10, 12]
    c2, ckpt2 = train(tmp_path / "b", remote_url, 20, flush_each=True)  # a new machine: empty local dir
    assert ckpt2.restored_step == 12
    assert c2.n == 20  # 12 restored + 8 trained
    assert RemoteStore(remote_url).committed() == [15, 20]


def test_plain_values_and_tensors_are_restored(tmp_path: Path, remote_url: str) -> None:
    train(tmp_path / "a", remote_url, 4)
    state = {"counter": Counter(), "w": torch.zeros(3), "tag": "y"}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "b", remote=remote_url) as ckpt:
        assert ckpt.restored_step == 4
    assert state["counter"].n == 4 and state["tag"] == "x"
    assert torch.equal(state["w"], torch.full((3,), 0.0 + 1 + 2 + 3))


def test_checkpoint_without_manifest_is_invisible(tmp_path: Path, remote_url: str) -> None:
    train(tmp_path / "a", remote_url, 10, flush_each=True)
    store = RemoteStore(remote_url)
    # step 15 uploaded its payload, but the manifest never made it (killed mid-upload)
    data = store.cat(f"{step_dirname(10)}/{PAYLOAD}")
    store.put_bytes(f"{step_dirname(15)}/{PAYLOAD}", data)
    local = tmp_path / "a"
    (local / step_dirname(16)).mkdir()  # renamed into place, killed before its manifest
    (local / step_dirname(16) / STEP_MARKER).write_bytes(b"")
    (local / step_dirname(16) / PAYLOAD).write_bytes(data)
    c, ckpt = train(local, remote_url, 10)
    assert ckpt.restored_step == 10
    assert not (local / step_dirname(16)).exists()  # crash leftover cleaned


def test_corrupt_local_payload_falls_back(tmp_path: Path) -> None:
    local = tmp_path / "ck"
    train(local, None, 10)
    assert LocalDir(local).committed() == [5, 10]
    p = local / step_dirname(10) / PAYLOAD
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))
    c, ckpt = train(local, None, 10)
    assert ckpt.restored_step == 5 and c.n == 10
    q = list((LocalDir(local).meta / "quarantine").iterdir())
    assert len(q) == 1 and q[0].name.startswith(step_dirname(10))
    events = [json.loads(x) for x in (LocalDir(local).meta / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "quarantine" and e["step"] == 10 for e in events)


def test_corrupt_remote_payload_falls_back(tmp_path: Path, remote_url: str) -> None:
    train(tmp_path / "a", remote_url, 10, flush_each=True)
    store = RemoteStore(remote_url)
    key = f"{step_dirname(10)}/{PAYLOAD}"
    data = bytearray(store.cat(key))
    data[100] ^= 0xFF
    store.put_bytes(key, bytes(data))
    c, ckpt = train(tmp_path / "b", remote_url, 10)
    assert ckpt.restored_step == 5 and c.n == 10
    assert 10 in store.committed()  # re-saved at the end after the fallback
    # the damaged upload was quarantined, not deleted: its manifest moved aside first
    # (the final save of step 10 then uploaded a good copy)
    assert store.read_manifest(10).step == 10


def test_truncated_remote_manifest_is_quarantined(tmp_path: Path, remote_url: str) -> None:
    train(tmp_path / "a", remote_url, 10, flush_each=True)
    store = RemoteStore(remote_url)
    store.put_bytes(f"{step_dirname(10)}/{MANIFEST}", b'{"format": "spotckpt/1", "st')
    c, ckpt = train(tmp_path / "b", remote_url, 10)
    assert ckpt.restored_step == 5
    assert f"{step_dirname(10)}/{MANIFEST}.quarantined" in store.find()


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_retention_keeps_exactly_keep_last(tmp_path: Path, remote_url: str, keep_last: int) -> None:
    train(tmp_path / "a", remote_url, 40, keep_last=keep_last, flush_each=True)
    want = [40 - 5 * i for i in range(keep_last)][::-1]
    assert LocalDir(tmp_path / "a").committed() == want
    assert RemoteStore(remote_url).committed() == want


def test_no_checkpoint_at_all_starts_fresh(tmp_path: Path, remote_url: str) -> None:
    c, ckpt = train(tmp_path / "a", remote_url, 3, every=100)
    assert ckpt.restored_step is None and c.n == 3
    assert RemoteStore(remote_url).committed() == [3]  # the final save


def test_second_process_on_same_dir_is_refused(tmp_path: Path) -> None:
    with spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path, remote=None):
        with pytest.raises(spotckpt.CheckpointLockedError, match="in use"):
            with spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path, remote=None):
                pass


def test_exception_in_loop_keeps_committed_state(tmp_path: Path, remote_url: str) -> None:
    state = {"counter": Counter()}
    with pytest.raises(ZeroDivisionError):
        with spotckpt.Checkpointer(state, local_dir=tmp_path / "a", remote=remote_url, every_steps=3) as ckpt:
            for step in ckpt.steps(10):
                state["counter"].n += 1
                if step == 7:
                    1 / 0
    committed = RemoteStore(remote_url).committed()
    assert committed[-1] == 6  # nothing after the failure was saved; 6 is durable


def test_save_is_async_and_snapshot_is_isolated(tmp_path: Path) -> None:
    w = torch.zeros(1000)
    state = {"w": w}
    with spotckpt.Checkpointer(state, local_dir=tmp_path, remote=None) as ckpt:
        ckpt.save()
        w.add_(1.0)  # changes after save() must not reach the checkpoint
        ckpt._writer.wait()
    state2 = {"w": torch.ones(1000)}
    with spotckpt.Checkpointer(state2, local_dir=tmp_path, remote=None):
        pass
    assert torch.equal(state2["w"], torch.zeros(1000))


def test_pickle_safe_serializer_refuses_code(tmp_path: Path) -> None:
    import pickle

    from spotckpt._errors import CorruptCheckpointError
    from spotckpt._state._snapshot import read_state

    class Evil:
        def __reduce__(self):
            return (time.sleep, (0,))

    (tmp_path / "state.pkl").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CorruptCheckpointError, match="refusing"):
        read_state(tmp_path, "pickle-safe")
    (tmp_path / "state.pkl").write_bytes(pickle.dumps({"x": b"ok", "n": [1, 2.5]}))
    assert read_state(tmp_path, "pickle-safe") == {"x": b"ok", "n": [1, 2.5]}


def test_torch_checkpoint_that_runs_code_does_not_load(tmp_path: Path) -> None:
    from spotckpt._errors import CorruptCheckpointError
    from spotckpt._state._snapshot import read_state

    class Evil:
        def __reduce__(self):
            return (time.sleep, (0,))

    torch.save({"x": Evil()}, tmp_path / "state.pt")
    with pytest.raises(CorruptCheckpointError):
        read_state(tmp_path, "torch")


def test_local_retention_catches_up_after_slow_uploads(tmp_path: Path, remote_url: str) -> None:
    """Checkpoints kept locally only because they were uploading are removed once their
    upload is done: at the end exactly keep_last remain, whatever the upload timing."""
    state = {"w": torch.zeros(200_000)}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "a", remote=remote_url, every_steps=1,
                               keep_last=1) as ckpt:
        for _ in ckpt.steps(25):
            state["w"] += 1
    assert LocalDir(tmp_path / "a").committed() == [25]
    assert RemoteStore(remote_url).committed() == [25]


def _as_format_1(manifest: bytes, payload_dir: Path) -> bytes:
    """A manifest as spotckpt 0.1 wrote it: format spotckpt/1, SHA-256 per file."""
    import hashlib

    d = json.loads(manifest)
    d["format"] = "spotckpt/1"
    for f in d["files"]:
        f.pop("xxh3_128")
        f["sha256"] = hashlib.sha256((payload_dir / f["path"]).read_bytes()).hexdigest()
    return json.dumps(d).encode()


def test_new_manifests_use_xxh3_and_format_1_sha256_ones_still_restore(tmp_path: Path, remote_url: str) -> None:
    train(tmp_path / "a", remote_url, 5, flush_each=True)
    store = RemoteStore(remote_url)
    d = json.loads(store.cat(f"{step_dirname(5)}/{MANIFEST}"))
    assert d["format"] == "spotckpt/2"
    assert [sorted(f) for f in d["files"]] == [["path", "size", "xxh3_128"]]
    # Rewrite the remote checkpoint as an older spotckpt left it: it restores and verifies.
    pdir = tmp_path / "a" / step_dirname(5)
    store.put_bytes(f"{step_dirname(5)}/{MANIFEST}", _as_format_1((pdir / MANIFEST).read_bytes(), pdir))
    c, ckpt = train(tmp_path / "b", remote_url, 7)
    assert ckpt.restored_step == 5 and c.n == 7
    # ...and its SHA-256 is really checked: a payload with one byte changed is refused.
    name = d["files"][0]["path"]
    data = bytearray((pdir / name).read_bytes())
    data[-1] ^= 1
    store.put_bytes(f"{step_dirname(5)}/{name}", bytes(data))
    from spotckpt._commit._manifest import Manifest, verify_dir

    (tmp_path / "c").mkdir()
    store.get_file(f"{step_dirname(5)}/{name}", tmp_path / "c" / name)
    with pytest.raises(spotckpt.CorruptCheckpointError, match="checksum"):
        verify_dir(tmp_path / "c", Manifest.from_json(store.cat(f"{step_dirname(5)}/{MANIFEST}")))


def test_a_superseded_steps_stream_leaves_nothing_on_the_remote(tmp_path: Path, s3_remote: str) -> None:
    """Regression: a stream started for step 5, whose step was superseded by step 6 before the
    Syncer took it, finished after step 6's retention had listed the remote, and its payload
    stayed there as a manifest-less dir (chaos suite: 1 orphan after a run's last upload)."""
    from spotckpt._commit._manifest import FileEntry, build_manifest, file_digest
    from spotckpt._sync._syncer import Syncer

    local = LocalDir(tmp_path / "ck")
    store = RemoteStore(s3_remote)
    assert store.fast is not None
    store.committed()  # as at start: the remote was listed
    slow = tmp_path / "being-written.pt"
    slow.write_bytes(b"x" * 1000)
    up = store.stream_file(slow, f"{step_dirname(5)}/state.pt")  # its writer is not done yet
    tmp = local.begin(6)
    (tmp / "state.pt").write_bytes(b"y" * 10)
    entries = [FileEntry("state.pt", 10, file_digest(tmp / "state.pt"))]
    local.commit(tmp, build_manifest(6, entries, framework="t", serializer="torch"))
    syncer = Syncer(local, store, keep_last=2, mirror=False)
    syncer.start()
    syncer.submit(6)
    assert syncer.close(60)
    up.finish(1000)  # the superseded writer finishes late
    up.wait(30)
    assert [k for k in store.find() if k.startswith(step_dirname(5))] == []
    assert store.committed() == [6]


def test_wait_durable(tmp_path: Path, remote_url: str) -> None:
    state = {"w": torch.zeros(3)}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "a", remote=remote_url) as ck:
        assert ck.wait_durable(timeout=1)  # nothing saved yet
        it = ck.steps(total=5)
        next(it)
        next(it)
        ck.save()
        assert ck.wait_durable(timeout=60) and ck.durable_step == 1
        assert RemoteStore(remote_url).committed() == [1]
        it.close()
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "b", remote=remote_url) as ck:
        assert ck.restored_step == 1 and ck.durable_step == 1
        assert ck.wait_durable(timeout=1)  # the restored checkpoint is on the remote already


@pytest.mark.parametrize("leave", ["with", "close"])
def test_notice_after_the_last_boundary_is_saved_on_leaving(tmp_path: Path, remote_url: str, leave: str) -> None:
    """A SIGTERM after the loop's last step boundary (say, during an evaluation after
    training): leaving the ``with`` block, or ``close()``, saves that step and makes it durable.
    Before the fix close() marked itself closed first, so its own interruption save was
    refused ("use the Checkpointer inside `with`")."""
    state = {"w": torch.zeros(3)}
    ck = spotckpt.Checkpointer(state, local_dir=tmp_path / "a", remote=remote_url, every_steps=100,
                               exit_on_interrupt=False)
    with ck if leave == "with" else contextlib.nullcontext():
        if leave == "close":
            ck.open()
        for _ in range(5):
            state["w"] = state["w"] + 1
            ck.step += 1
            ck.boundary()
        os.kill(os.getpid(), signal.SIGTERM)
        end = time.monotonic() + 30
        while not ck.should_stop and time.monotonic() < end:  # (the handler runs between bytecodes)
            time.sleep(0.001)
        assert ck.should_stop and not ck.interrupted
        if leave == "close":
            ck.close()
    assert ck.interrupted and ck.durable_step == 5
    assert RemoteStore(remote_url).committed() == [5]
