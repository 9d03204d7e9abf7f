"""Upload from memory (issue 25 item 2): a payload whose bytes are all in memory before it is
written (the ``safetensors`` payload) is uploaded from those buffers, beside the local write,
and never read back from the file; the commit protocol is unchanged (the Syncer confirms the
streamed payload, then writes the manifest last).

On a real S3 server (moto on loopback): the bytes the process reads from files during a save
are counted by the kernel (``/proc/self/io`` ``rchar``), so "never read back" is measured, not
inferred."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

import spotckpt
from spotckpt._commit import file_digest
from spotckpt._commit._manifest import MANIFEST, step_dirname
from spotckpt._remote._store import RemoteStore
from spotckpt._state._tensorfile import NAME

MiB = 1 << 20


def rchar() -> int:
    """Bytes this process read through read()/pread() (from disk or the page cache)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


def test_payload_is_uploaded_from_memory_not_read_back(tmp_path: Path, s3_server, s3_env: dict) -> None:
    """Before: the stream followed the file with 64 KiB preads and XXH3 re-read it, so a save
    read the payload back twice (rchar >= 2x its size)."""
    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/run/"
    state = {"w": torch.rand(12 * MiB // 4), "v": torch.rand(30 * MiB // 4), "n": 0}  # 42 MiB: 3 parts
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "ck", remote=remote) as ck:
        it = ck.steps(total=3)
        next(it)
        ck.save()
        assert ck.flush(120)  # the first save: buffers allocated, client built
        next(it)
        state["n"] = 1
        state["w"] += 1
        before = rchar()
        ck.save()
        assert ck.flush(120)
        read = rchar() - before
        step = ck.step
        it.close()
    local = tmp_path / "ck" / step_dirname(step) / NAME
    size = local.stat().st_size
    assert size > 40 * MiB
    assert read < size // 8, f"read {read} bytes back during a save of {size}"
    store = RemoteStore(remote)
    assert store.cat(f"{step_dirname(step)}/{NAME}") == local.read_bytes()
    m = json.loads(store.cat(f"{step_dirname(step)}/{MANIFEST}"))
    assert m["files"][0]["xxh3_128"] == file_digest(local)
    fresh = {"w": torch.zeros(1), "v": torch.zeros(1), "n": -1}
    with spotckpt.Checkpointer(fresh, local_dir=tmp_path / "other", remote=remote) as ck:
        assert ck.restored_step == step
    assert fresh["n"] == 1 and torch.equal(fresh["w"], state["w"]) and torch.equal(fresh["v"], state["v"])


@pytest.mark.parametrize("release_at", ["before-send", "mid-send"])
def test_buffers_changed_after_release_never_reach_the_remote(tmp_path: Path, s3_server, s3_env: dict,
                                                              release_at: str) -> None:
    """The writer may refill the buffers once ``release()`` returned: what the remote gets
    is still exactly the file (parts not yet sent are read from the complete file)."""
    bucket = s3_server.new_bucket()
    store = RemoteStore(f"s3://{bucket}/run/")
    bufs = [bytearray(os.urandom(n)) for n in (5 * MiB, 17 * MiB + 3, 0, 20 * MiB)]
    size = sum(map(len, bufs))
    path = tmp_path / "payload.bin"
    up = store.stream_file(path, "step-000000000001/payload.bin")
    assert up is not None
    gate = threading.Event()
    if release_at == "before-send":
        # the writer finishes before the stream sends anything: every part comes from the file
        orig = up._body

        def late(offset: int, length: int):  # noqa: ANN202
            gate.wait(60)
            return orig(offset, length)
        up._body = late
    release = up.feed(bufs, size)
    with open(path, "wb") as f:
        for b in bufs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    expected = path.read_bytes()
    up.finish(size)
    release()
    for b in bufs:
        b[:] = b"\xee" * len(b)  # the training thread's next snapshot
    gate.set()
    assert up.wait(120), up.error
    assert up.matches(path)
    assert store.cat("step-000000000001/payload.bin") == expected
