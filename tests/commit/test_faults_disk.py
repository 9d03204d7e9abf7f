"""Disk faults: the local dir's disk fills up (a 2 MiB tmpfs; skipped where mounting is not
permitted).

Policy (docs/guarantees.md, "Failure policies"): a save that cannot be written stops training with a
``LocalDirError`` that names the step, the dir and the cause and says which checkpoint is
intact; that checkpoint stays verified and (with a remote) durable, and a restart resumes
from it. A restore that does not fit fails at once with the cause, leaving no partial files.
"""
from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import spotckpt
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import verify_dir
from spotckpt._remote._store import RemoteStore


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".step-") or
                  (p.name.startswith("step-") and not (p / "MANIFEST.json").exists()))


@pytest.mark.parametrize("serializer", ["torch", "pickle-safe"])
def test_full_disk_during_save_stops_with_clear_error(tmp_path: Path, small_disk: Path, serializer: str) -> None:
    """Regression (torch): torch.save reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``; it now surfaces as the same clear LocalDirError."""
    if serializer == "pickle-safe":
        return run_without_torch(tmp_path, small_disk)
    import torch  # noqa: F401 - with torch imported, spotckpt saves with torch.save

    remote = f"file://{tmp_path / 'remote'}/"
    state = {"n": 0, "blob": b""}
    with pytest.raises(spotckpt.LocalDirError) as ei:
        with spotckpt.Checkpointer(state, local_dir=small_disk, remote=remote, every_steps=5) as ckpt:
            for step in ckpt.steps(20):
                state["n"] += 1
                if step == 7:
                    state["blob"] = random.randbytes(3_000_000)  # the step-10 save will not fit
    msg = str(ei.value)
    assert "No space left on device" in msg and "step 10" in msg and str(small_disk) in msg, msg
    assert "checkpoint step 5 is intact" in msg and "\n" not in msg
    assert isinstance(ei.value, OSError) and ei.value.errno == 28
    local = LocalDir(small_disk)
    assert local.committed() == [5] and leftovers(small_disk) == []
    verify_dir(local.path(5), local.read_manifest(5))
    assert RemoteStore(remote).committed() == [5]  # and durable
    # a restart on a machine with room resumes from it
    state2 = {"n": -1, "blob": None}
    with spotckpt.Checkpointer(state2, local_dir=tmp_path / "big", remote=remote) as ckpt2:
        assert ckpt2.restored_step == 5
    assert state2 == {"n": 5, "blob": b""}


def run_without_torch(tmp_path: Path, disk: Path) -> None:
    """The same in a process that never imports torch (spotckpt then pickles)."""
    code = f"""
import random, sys, spotckpt
state = {{"n": 0, "blob": b""}}
try:
    with spotckpt.Checkpointer(state, local_dir={str(disk)!r}, remote={f"file://{tmp_path}/remote/"!r},
                               every_steps=5) as ckpt:
        for step in ckpt.steps(20):
            state["n"] += 1
            if step == 7:
                state["blob"] = random.randbytes(3_000_000)
except spotckpt.LocalDirError as e:
    assert "torch" not in sys.modules
    print("LocalDirError:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    msg = r.stdout.strip()
    assert "No space left on device" in msg and "step 10" in msg and "checkpoint step 5 is intact" in msg, msg
    local = LocalDir(disk)
    assert local.committed() == [5] and leftovers(disk) == []
    verify_dir(local.path(5), local.read_manifest(5))
    assert RemoteStore(f"file://{tmp_path}/remote/").committed() == [5]


def test_restore_that_does_not_fit_fails_at_once(tmp_path: Path, small_disk: Path) -> None:
    remote = f"file://{tmp_path / 'remote'}/"
    state = {"blob": random.randbytes(3_000_000)}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "big", remote=remote) as ckpt:
        ckpt.save(blocking=True)
        assert ckpt.flush(30)
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        with spotckpt.Checkpointer({"blob": b""}, local_dir=small_disk, remote=remote):
            pass
    took = time.monotonic() - t0
    msg = str(ei.value)
    # refused up front by the free-space check, or by ENOSPC if space ran out mid-download
    assert isinstance(ei.value, spotckpt.LocalDirError), msg
    assert ("free" in msg or "No space left on device" in msg) and "\n" not in msg, msg
    assert took < 5, f"{took:.1f} s: a full disk is not worth retrying"
    assert leftovers(small_disk) == []
    assert RemoteStore(remote).committed() == [0]  # the remote copy is untouched
