"""Lineages: several Checkpointers on one remote (``name=``), and what a step number may be.

Real Checkpointers on the moto S3 server; a restart is a new Checkpointer on an empty local
dir, as on a new machine.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import spotckpt
from spotckpt import CheckpointLockedError, ConfigError
from spotckpt._remote._store import RemoteStore


def keys(remote: str) -> list[str]:
    return RemoteStore(remote).list_keys()


def test_model_and_ema_checkpointers_share_a_local_dir_and_a_remote(
        tmp_path: Path, s3_remote: str, caplog: pytest.LogCaptureFixture) -> None:
    """Unnamed (model) and name='ema' in one process, one local dir, one remote: each
    restores its own state on a new machine; the unnamed layout is today's."""
    local = tmp_path / "a"
    model, ema = {"w": torch.zeros(4)}, {"w": torch.zeros(4)}
    with spotckpt.Checkpointer(model, local_dir=local, remote=s3_remote, every_steps=3) as cm, \
            spotckpt.Checkpointer(ema, local_dir=local, remote=s3_remote, every_steps=3, name="ema") as ce:
        (local / "notes.txt").write_text("the script's own file")  # mirrored by the unnamed one
        for step in cm.steps(6):
            model["w"] = torch.full((4,), float(step + 1))
            ema["w"] = torch.full((4,), -float(step + 1))
            ce.step = cm.step + 1
            ce.boundary()
        ce.save()
        assert cm.flush(60) and ce.flush(60)
        assert cm.durable_step == 6 and ce.durable_step == 6
    assert (local / "step-000000000006").is_dir() and (local / "ckpt-ema" / "step-000000000006").is_dir()
    got = keys(s3_remote)
    assert "step-000000000006/MANIFEST.json" in got and "ckpt-ema/step-000000000006/MANIFEST.json" in got
    assert "files/" not in "".join(k for k in got if "ckpt-ema" in k)  # never mirrored as a user file
    assert not any(k.startswith("files/") and "ckpt-ema" in k for k in got)
    assert not any(k.startswith("ckpt-ema/files/") for k in got)

    caplog.set_level(logging.WARNING, logger="spotckpt")
    fresh = tmp_path / "b"  # a new machine
    model2, ema2 = {"w": torch.zeros(4)}, {"w": torch.zeros(4)}
    with spotckpt.Checkpointer(ema2, local_dir=fresh, remote=s3_remote, name="ema") as ce2, \
            spotckpt.Checkpointer(model2, local_dir=fresh, remote=s3_remote) as cm2:
        assert (ce2.restored_step, cm2.restored_step) == (6, 6)
        assert ce2.durable_step == cm2.durable_step == 6
    assert torch.equal(model2["w"], torch.full((4,), 6.0))
    assert torch.equal(ema2["w"], torch.full((4,), -6.0))
    assert (fresh / "notes.txt").read_text() == "the script's own file"
    assert "not spotckpt's" not in caplog.text  # ckpt-ema/ is not foreign to the unnamed lineage


def test_second_checkpointer_on_the_same_remote_and_name_is_refused(tmp_path: Path, s3_remote: str) -> None:
    first = spotckpt.Checkpointer({"G": torch.zeros(2)}, local_dir=tmp_path / "g", remote=s3_remote)
    with first:
        second = spotckpt.Checkpointer({"D": torch.zeros(2)}, local_dir=tmp_path / "d", remote=s3_remote)
        with pytest.raises(CheckpointLockedError) as err:
            second.open()
        msg = str(err.value)
        assert "['G']" in msg and "['D']" in msg and str(tmp_path / "g") in msg and str(tmp_path / "d") in msg
        assert s3_remote in msg and "name=" in msg
        with spotckpt.Checkpointer({"D": torch.zeros(2)}, local_dir=tmp_path / "d", remote=s3_remote,
                                   name="D") as named:  # its own name: fine
            with pytest.raises(CheckpointLockedError, match="name='D'"):
                spotckpt.Checkpointer({"E": 1}, local_dir=tmp_path / "e", remote=s3_remote, name="D").open()
            named.save(blocking=True)
    with second:  # the first one closed: the lineage is free again
        pass


def test_invalid_name_is_refused_at_entry(tmp_path: Path) -> None:
    for bad in ("", "a/b", "../x", "-x", "x" * 65, "a b"):
        with pytest.raises(ConfigError, match="name="):
            spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path, remote=None, name=bad).open()


@pytest.mark.slow
def test_cli_sees_named_lineages(tmp_path: Path, s3_remote: str, capsys: pytest.CaptureFixture) -> None:
    from spotckpt.cli._main import main

    with spotckpt.Checkpointer({"w": torch.zeros(2)}, local_dir=tmp_path / "a", remote=s3_remote,
                               name="ema") as ck:
        ck.step = 7
        ck.save()
        assert ck.flush(60)
    common = ["--local-dir", str(tmp_path / "b"), "--remote", s3_remote, "--json"]
    capsys.readouterr()
    assert main(["ls", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checkpoints"] == [] and doc["names"] == ["ema"]
    assert main(["ls", "--name", "ema", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in doc["checkpoints"]] == [7] and doc["remote"] == s3_remote + "ckpt-ema/"
    assert main(["pull", "--name", "ema", *common]) == 0
    assert (tmp_path / "b" / "ckpt-ema" / "step-000000000007" / "MANIFEST.json").is_file()
    assert (tmp_path / "b" / "ckpt-ema" / ".spotckpt-name.sagemaker-ignore").is_file()
    for cmd in ("verify", "status", "push"):
        assert main([cmd, "--name", "ema", *common]) == 0, cmd
        capsys.readouterr()
    assert main(["verify", "--name", "nope", *common]) == 0  # an empty lineage
    got = keys(s3_remote)
    assert not any(k.startswith(("files/", "ckpt-ema/files/")) for k in got), got  # nothing mirrored


# -- step numbers ------------------------------------------------------------------------------
def test_step_out_of_range_fails_at_the_save_not_in_the_background(tmp_path: Path, s3_remote: str) -> None:
    state = {"w": torch.zeros(2)}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "a", remote=s3_remote) as ck:
        ck.step = 10**12  # a token counter used as the step
        with pytest.raises(ConfigError, match=r"step 1000000000000 is out of range.*0 to 999999999999"):
            ck.save()
        with pytest.raises(ConfigError, match="out of range"):
            ck.boundary()
        ck.step = 10**12 - 1  # the largest step there is
        ck.save()
        assert ck.flush(60) and ck.durable_step == 10**12 - 1
    with spotckpt.Checkpointer({"w": torch.zeros(2)}, local_dir=tmp_path / "b", remote=s3_remote) as ck2:
        assert ck2.restored_step == 10**12 - 1


def test_step_going_backwards_is_an_error_and_a_named_phase_is_the_fix(tmp_path: Path, s3_remote: str) -> None:
    state = {"w": torch.zeros(2)}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "a", remote=s3_remote, every_steps=5) as ck:
        for _ in ck.steps(10):
            state["w"] += 1
        assert ck.flush(60) and ck.durable_step == 10
        ck.step = 0  # phase 2 counts from 0 again
        with pytest.raises(ConfigError, match=r"step 0 .* already has step 10.*name="):
            ck.save()
        ck.step = 1
        with pytest.raises(ConfigError, match=r"step 1 .* already has step 10"):
            ck.boundary()
        assert ck.durable_step == 10
    phase2 = {"w": torch.zeros(2)}
    with spotckpt.Checkpointer(phase2, local_dir=tmp_path / "a", remote=s3_remote, every_steps=2,
                               name="phase2") as p2:
        for _ in p2.steps(4):
            phase2["w"] -= 1
        assert p2.flush(60) and p2.durable_step == 4
    fresh = tmp_path / "b"  # a new machine: each phase resumes where it was
    s1, s2 = {"w": torch.zeros(2)}, {"w": torch.zeros(2)}
    with spotckpt.Checkpointer(s1, local_dir=fresh, remote=s3_remote) as r1, \
            spotckpt.Checkpointer(s2, local_dir=fresh, remote=s3_remote, name="phase2") as r2:
        assert (r1.restored_step, r1.durable_step) == (10, 10)
        assert (r2.restored_step, r2.durable_step) == (4, 4)
        assert list(r1.steps(10)) == []  # phase 1 is done
    assert torch.equal(s1["w"], torch.full((2,), 10.0)) and torch.equal(s2["w"], torch.full((2,), -4.0))


def test_local_only_lineages_are_locked_per_name(tmp_path: Path) -> None:
    """Without a remote the local dir's lock (a flock: other processes too) is per lineage."""
    with spotckpt.Checkpointer({"a": 1}, local_dir=tmp_path, remote=None), \
            spotckpt.Checkpointer({"b": 2}, local_dir=tmp_path, remote=None, name="b") as cb:
        with pytest.raises(CheckpointLockedError, match="ckpt-b"):
            spotckpt.Checkpointer({"c": 3}, local_dir=tmp_path, remote=None, name="b").open()
        cb.step = 3
        cb.save(blocking=True)
    assert (tmp_path / "ckpt-b" / "step-000000000003" / "MANIFEST.json").is_file()
    assert not any(p.name.startswith("step-") for p in tmp_path.iterdir())
