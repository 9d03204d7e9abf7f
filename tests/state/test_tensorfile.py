"""The ``safetensors`` payload (spotckpt/_state/_tensorfile.py, issue 25 item 1): tensors written
raw in one pass, opened by ``safetensors.safe_open``, restored exactly; and hostile files (a
truncated header, offsets past the end or overlapping, a dtype or shape that disagrees with
the bytes, a header that lies about the state) refused with one line naming the file, the
start falling back to the previous checkpoint. The hostile cases carry a manifest whose sizes
and checksums match them: only the format's own checks stand between them and the state."""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from chaoslib import events
from hypothesis import HealthCheck, given, settings, strategies as st

import spotckpt
from spotckpt._commit import LocalDir, build_manifest, file_digest
from spotckpt._commit._manifest import MANIFEST, FileEntry, step_dirname
from spotckpt._remote._store import RemoteStore
from spotckpt._state import _snapshot, _tensorfile
from spotckpt._state._tensorfile import NAME, VALUES

safetensors = pytest.importorskip("safetensors")


def model_state() -> dict[str, Any]:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(3, 5)).sum().backward()
    opt.step()
    extra = {"half": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "empty": torch.zeros(0, 4),
             "scalar": torch.tensor(2.5), "flags": torch.tensor([True, False]), "i8": torch.tensor([-3], dtype=torch.int8),
             "transposed": torch.arange(12.0).reshape(3, 4).t(), "complex": torch.tensor([1 + 2j]),
             "tuple": (torch.ones(2), "x"), "deque": collections.deque([torch.zeros(1)], maxlen=3),
             "epoch": 7, "name": "run"}
    return {"model": model, "opt": opt, "extra": extra}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, collections.deque)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_payload_is_a_safetensors_file_and_restores_exactly(tmp_path: Path) -> None:
    state = model_state()
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "ck") as ckpt:
        ckpt.save(blocking=True)
        step = ckpt.step
    d = tmp_path / "ck" / step_dirname(step)
    m = json.loads((d / MANIFEST).read_text())
    assert m["serializer"] == "safetensors" and [f["path"] for f in m["files"]] == [NAME]
    # the one checksum, computed while writing, is the file's XXH3
    assert m["files"][0]["xxh3_128"] == file_digest(d / NAME)
    with safetensors.safe_open(d / NAME, "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("model/0.weight"), state["model"][0].weight.detach())
        assert f.get_tensor("extra/half").dtype == torch.bfloat16
    assert {"model/0.weight", "model/1.bias", "extra/empty", "extra/scalar", VALUES} <= keys
    assert not any("complex" in k for k in keys)  # no such dtype in the layout: in the values part
    expected = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
    fresh = model_state()
    for p in fresh["model"].parameters():
        p.data.zero_()
    fresh["extra"] = {}
    with spotckpt.Checkpointer(fresh, local_dir=tmp_path / "ck") as ckpt:
        assert ckpt.restored_step == step
    got = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in fresh.items()}
    assert same(expected, got)


def test_torch_format_still_reads(tmp_path: Path) -> None:
    """The ``torch`` serializer (one torch.save file, what earlier versions wrote) still
    loads; tests/checkpointer/test_public_api.py restores one written by that code."""
    payload = _snapshot.snapshot({"w": torch.ones(3), "n": 1})
    entries = _snapshot.write_state(tmp_path, payload, "torch")
    assert [e.path for e in entries] == ["state.pt"]
    out = _snapshot.read_state(tmp_path, "torch")
    assert torch.equal(out["w"], torch.ones(3)) and out["n"] == 1


# -- hostile files --------------------------------------------------------------------------
_GOOD: list[bytes] = []


def good_file(tmp_path: Path) -> bytes:
    if _GOOD:
        return _GOOD[0]
    d = tmp_path / "good"
    d.mkdir()
    payload = _snapshot.snapshot({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int16),
                                  "e": torch.zeros(0), "n": 5})
    _snapshot.write_state(d, payload, _tensorfile.SERIALIZER)
    _GOOD.append((d / NAME).read_bytes())
    return _GOOD[0]


def split_file(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_file(header: dict | bytes, body: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + body


OTHER_DTYPES = ["F64", "F16", "I8", "U8", "BOOL", "I64", "C64", "str", 3]


@st.composite
def hostile(draw: st.DrawFn, good: bytes) -> tuple[str, bytes]:
    """A damaged or lying variant of ``good``, and what was done to it."""
    header, body = split_file(good)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["truncate", "length", "dtype", "shape", "offsets", "overlap", "drop-entry",
                                 "extra-entry", "rename", "metadata", "not-json", "duplicate", "body-short",
                                 "body-long"]))
    e = header.get(name)
    if kind == "truncate":
        return kind, good[:draw(st.integers(0, len(good) - 1))]
    if kind == "length":
        n = int.from_bytes(good[:8], "little")
        bad = draw(st.integers(0, 2**64 - 1).filter(lambda x: x != n))
        return kind, bad.to_bytes(8, "little") + good[8:]
    if kind == "dtype":
        e["dtype"] = draw(st.sampled_from([d for d in OTHER_DTYPES if d != e["dtype"]]))
    elif kind == "shape":
        e["shape"] = draw(st.sampled_from([[*e["shape"], 2], [x + 1 for x in e["shape"]] or [1], [-1], "3", [1.5]]))
    elif kind == "offsets":
        a, b = e["data_offsets"]
        delta = draw(st.integers(-8, 1 << 40).filter(lambda x: x != 0))
        e["data_offsets"] = draw(st.sampled_from([[a + delta, b + delta], [a, b + delta], [b, a], [a], "0-4"]))
    elif kind == "overlap":
        other = draw(st.sampled_from(names))
        e["data_offsets"] = list(header[other]["data_offsets"])
        if other == name:
            e["data_offsets"][1] += 1
    elif kind == "drop-entry":
        header.pop(name)
    elif kind == "extra-entry":
        header["ghost"] = {"dtype": "U8", "shape": [0], "data_offsets": [len(body), len(body)]}
    elif kind == "rename":
        header[name + "x"] = header.pop(name)
    elif kind == "metadata":
        header["__metadata__"] = draw(st.sampled_from([{"a": 1}, ["x"], "s", {"k": None}]))
    elif kind == "not-json":
        return kind, join_file(draw(st.sampled_from([b"{", b"\xff\xfe", b"[1,2]", b"null", b"{}"])), body)
    elif kind == "duplicate":
        head = json.dumps(header).encode()
        dup = json.dumps({name: e})[1:-1].encode()
        return kind, join_file(head[:-1] + b"," + dup + b"}", body)
    elif kind == "body-short":
        return kind, join_file(header, body[:-draw(st.integers(1, len(body)))])
    elif kind == "body-long":
        return kind, join_file(header, body + b"\0" * draw(st.integers(1, 64)))
    if header == split_file(good)[0]:  # e.g. [b, a] of an empty tensor: nothing changed
        return kind, good
    return kind, join_file(header, body)


def manifest_for(data: bytes, path: Path) -> Any:
    from spotckpt._commit import hasher

    h = hasher()
    h.update(data)
    return build_manifest(10, [FileEntry(NAME, len(data), h.hexdigest())], framework="t",
                          serializer=_tensorfile.SERIALIZER)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_file_is_refused_naming_it(tmp_path: Path, data: st.DataObject) -> None:
    """Every variant is refused with one line naming the file: never a state, never another
    exception (a MemoryError from an absurd shape, a torch error, a KeyError)."""
    good = good_file(tmp_path)
    kind, bad = data.draw(hostile(good))
    if bad == good:
        return
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / NAME).write_bytes(bad)
    with pytest.raises(spotckpt.CorruptCheckpointError) as ei:
        _snapshot.read_state(d, _tensorfile.SERIALIZER, manifest_for(bad, d / NAME))
    msg = str(ei.value)
    assert msg.startswith("spotckpt:") and "\n" not in msg and str(d) in msg, (kind, msg)


def test_bytes_that_fail_the_checksum_are_never_returned(tmp_path: Path) -> None:
    good = good_file(tmp_path)
    m = manifest_for(good, tmp_path)
    header, body = split_file(good)
    flipped = bytearray(good)
    flipped[-len(body) + 3] ^= 1  # inside a tensor: the header still parses
    d = tmp_path / "bad"
    d.mkdir()
    (d / NAME).write_bytes(bytes(flipped))
    with pytest.raises(spotckpt.CorruptCheckpointError, match="fails its checksum"):
        _snapshot.read_state(d, _tensorfile.SERIALIZER, m)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_lying_checkpoint_is_quarantined_and_restore_falls_back(tmp_path: Path, s3_server: Any, s3_env: dict,
                                                                 data: st.DataObject) -> None:
    """End to end, on a remote: step 10's payload lies (its manifest matches it); a new
    machine restores step 5, quarantines step 10 locally and remotely (kept, not deleted)."""
    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/run/"
    run = tmp_path / f"run-{data.draw(st.integers(0, 1 << 30))}"
    state = {"w": torch.zeros(8), "n": 0}
    with spotckpt.Checkpointer(state, local_dir=run / "a", remote=remote, every_steps=5) as ckpt:
        for _ in ckpt.steps(10):
            state["w"] += 1
            state["n"] += 1
            assert ckpt.flush(60)
    store = RemoteStore(remote)
    good = store.cat(f"{step_dirname(10)}/{NAME}")
    kind, bad = data.draw(hostile(good))
    if bad == good:
        return
    m = json.loads(store.cat(f"{step_dirname(10)}/{MANIFEST}"))
    f = m["files"][0]
    f["size"] = len(bad)
    f["xxh3_128"] = manifest_for(bad, run).files[0].digest
    store.put_bytes(f"{step_dirname(10)}/{NAME}", bad)
    store.put_bytes(f"{step_dirname(10)}/{MANIFEST}", json.dumps(m).encode())
    fresh = {"w": torch.full((8,), -1.0), "n": -1}
    with spotckpt.Checkpointer(fresh, local_dir=run / "b", remote=remote, every_steps=100) as ckpt:
        assert ckpt.restored_step == 5, kind
        assert fresh["n"] == 5 and torch.equal(fresh["w"], torch.full((8,), 5.0))
    q = [e for e in events(run / "b") if e["event"] == "quarantine"]
    assert q and q[0]["step"] == 10 and NAME in q[0]["error"] and "\n" not in q[0]["error"], (kind, q)
    assert len(list((LocalDir(run / "b").meta / "quarantine").iterdir())) == 1
    assert f"{step_dirname(10)}/{MANIFEST}.quarantined" in store.find()
