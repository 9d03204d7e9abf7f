"""``Checkpointer.commit_dir``: a directory a framework wrote (a Transformers ``checkpoint-N/``)
committed as one step, on file:// and on the S3 server, and restored on an empty dir."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import spotckpt
from spotckpt._commit._manifest import MANIFEST


def framework_dir(d: Path, tag: bytes) -> dict[str, bytes]:
    files = {"model.safetensors": b"w" * 5000 + tag, "optimizer.pt": b"o" * 300 + tag,
             "trainer_state.json": b'{"global_step": 3}', "sub/extra.bin": tag}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return files


def test_commit_dir_is_one_step_restored_whole_on_an_empty_dir(tmp_path: Path, remote_url: str) -> None:
    src = tmp_path / "checkpoint-3"
    files = framework_dir(src, b"A")
    with spotckpt.Checkpointer(None, local_dir=tmp_path / "a", remote=remote_url, framework="transformers") as ck:
        assert ck.restored_path is None
        ck.step = 3
        ck.commit_dir(src)
        shutil.rmtree(src)  # the framework may rotate its dir at once: the step holds links
        assert ck.flush(60)
        committed = tmp_path / "a" / "step-000000000003"
        assert sorted(f.relative_to(committed).as_posix() for f in committed.rglob("*") if f.is_file()
                      and not f.name.startswith(".")) == sorted([*files, MANIFEST])
        with pytest.raises(RuntimeError, match="commit_dir"):
            ck.save()
    with spotckpt.Checkpointer(None, local_dir=tmp_path / "b", remote=remote_url) as ck:
        assert ck.restored_step == 3 and ck.restored_path == tmp_path / "b" / "step-000000000003"
        for rel, data in files.items():
            assert (ck.restored_path / rel).read_bytes() == data
    # a job that saves a state must not take a directory checkpoint for its own
    with pytest.raises(spotckpt.ConfigError, match="commits directories"):
        with spotckpt.Checkpointer({"w": torch.zeros(1)}, local_dir=tmp_path / "c", remote=remote_url):
            pass


def test_commit_dir_links_instead_of_copying(tmp_path: Path) -> None:
    src = tmp_path / "checkpoint-1"
    framework_dir(src, b"B")
    with spotckpt.Checkpointer(None, local_dir=tmp_path / "ck", remote=None) as ck:
        ck.step = 1
        ck.commit_dir(src, only=lambda rel: rel != "optimizer.pt")
    step = tmp_path / "ck" / "step-000000000001"
    assert os.stat(step / "model.safetensors").st_ino == os.stat(src / "model.safetensors").st_ino
    assert not (step / "optimizer.pt").exists() and (step / "sub" / "extra.bin").read_bytes() == b"B"
