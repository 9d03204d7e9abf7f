"""Corruption of payloads and manifests, locally and on the remote: detected by size or
checksum, quarantined (moved aside, never deleted), restore falls back to the next older
checkpoint. Extends tests/commit/test_commit_restore.py (bit flip in a local and a remote payload,
truncated remote manifest) with the other damage/target/place combinations."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

import spotckpt
from chaoslib import events
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import MANIFEST, step_dirname
from spotckpt._remote._store import RemoteStore

D10 = step_dirname(10)


def flip_bit(b: bytes) -> bytes:
    a = bytearray(b)
    a[len(a) // 2] ^= 0x10
    return bytes(a)


def truncate(b: bytes) -> bytes:
    return b[: len(b) // 2]


def flip_checksum(b: bytes) -> bytes:
    """Still valid JSON, one hex digit of a checksum changed."""
    d = json.loads(b)
    f = d["files"][0]
    algo = "xxh3_128" if "xxh3_128" in f else "sha256"
    f[algo] = ("0" if f[algo][0] != "0" else "1") + f[algo][1:]
    return json.dumps(d).encode()


def flip_size(b: bytes) -> bytes:
    d = json.loads(b)
    d["files"][0]["size"] += 1
    return json.dumps(d).encode()


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "bitflip": flip_bit, "truncate": truncate, "checksum": flip_checksum, "size": flip_size}


def payload_name(local_or_store: Path | RemoteStore) -> str:
    if isinstance(local_or_store, RemoteStore):
        return json.loads(local_or_store.cat(f"{D10}/{MANIFEST}"))["files"][0]["path"]
    return json.loads((local_or_store / D10 / MANIFEST).read_text())["files"][0]["path"]


def train(local: Path, remote: str | None) -> dict:
    state = {"n": 0, "w": [0.0] * 64}
    at5: dict = {}
    with spotckpt.Checkpointer(state, local_dir=local, remote=remote, every_steps=5) as ckpt:
        for step in ckpt.steps(10):
            state["n"] += 1
            state["w"] = [x + step for x in state["w"]]
            if step == 4:
                at5 = {"n": state["n"], "w": list(state["w"])}
            if remote:
                assert ckpt.flush(30)
    return at5


PAYLOAD = "payload"  # the payload file, whatever the serializer named it

CASES = [(PAYLOAD, "truncate"), (MANIFEST, "bitflip"), (MANIFEST, "truncate"), (MANIFEST, "checksum"),
         (MANIFEST, "size")]


@pytest.mark.parametrize("target,damage", CASES)
def test_local_damage_is_quarantined_and_restore_falls_back(tmp_path: Path, target: str, damage: str) -> None:
    local = tmp_path / "ck"
    at5 = train(local, None)
    target = payload_name(local) if target == PAYLOAD else target
    p = local / D10 / target
    p.write_bytes(DAMAGE[damage](p.read_bytes()))
    state = {"n": -1, "w": None}
    with spotckpt.Checkpointer(state, local_dir=local, remote=None) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5
    q = list((LocalDir(local).meta / "quarantine").iterdir())
    assert len(q) == 1 and q[0].name.startswith(D10) and (q[0] / target).exists()
    assert any(e["event"] == "quarantine" and e["step"] == 10 for e in events(local))


@pytest.mark.parametrize("target,damage", [(PAYLOAD, "truncate"), (MANIFEST, "checksum"), (MANIFEST, "size"),
                                           (MANIFEST, "bitflip")])
def test_remote_damage_is_quarantined_and_restore_falls_back(tmp_path: Path, remote_url: str, target: str,
                                                             damage: str) -> None:
    at5 = train(tmp_path / "a", remote_url)
    store = RemoteStore(remote_url)
    target = payload_name(store) if target == PAYLOAD else target
    key = f"{D10}/{target}"
    store.put_bytes(key, DAMAGE[damage](store.cat(key)))
    state = {"n": -1, "w": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "b", remote=remote_url) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5
    keys = store.find()
    # the damaged upload is kept aside: manifest renamed, payload in place (the final save
    # of the resumed run then committed a good step 10 again)
    assert f"{D10}/{MANIFEST}.quarantined" in keys
    q = [e for e in events(tmp_path / "b") if e["event"] == "quarantine"]
    assert q and q[0]["where"] == "remote" and q[0]["error"].startswith("spotckpt:")


def test_damaged_local_copy_restores_the_same_step_from_the_remote(tmp_path: Path, remote_url: str) -> None:
    """A bit flip in the local copy costs nothing when the remote copy is good."""
    local = tmp_path / "a"
    train(local, remote_url)
    p = local / D10 / payload_name(local)
    p.write_bytes(flip_bit(p.read_bytes()))
    state = {"n": -1, "w": None}
    with spotckpt.Checkpointer(state, local_dir=local, remote=remote_url) as ckpt:
        assert ckpt.restored_step == 10
    assert state["n"] == 10
    assert len(list((LocalDir(local).meta / "quarantine").iterdir())) == 1


def test_newest_damaged_everywhere_falls_back_to_older(tmp_path: Path, remote_url: str) -> None:
    local = tmp_path / "a"
    at5 = train(local, remote_url)
    name = payload_name(local)
    p = local / D10 / name
    p.write_bytes(truncate(p.read_bytes()))
    store = RemoteStore(remote_url)
    store.put_bytes(f"{D10}/{name}", flip_bit(store.cat(f"{D10}/{name}")))
    state = {"n": -1, "w": None}
    with spotckpt.Checkpointer(state, local_dir=local, remote=remote_url) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5
    wheres = sorted(e["where"] for e in events(local) if e["event"] == "quarantine")
    assert wheres == ["local", "remote"]
