"""Hostile remote content: manifests with escaping paths, absurd sizes, invalid JSON, unknown
versions; object keys that escape the prefix; payloads that would run code when loaded.

Each is refused with a clear error (and, for a checkpoint, quarantined so restore falls back
to the next older one); nothing is written outside the local dir and nothing is executed.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
from chaoslib import events
from conftest import S3Server

import spotckpt
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import MANIFEST, step_dirname
from spotckpt._remote._store import RemoteStore
from spotckpt._watch._pull import restore_files

D10 = step_dirname(10)


def trained(tmp_path: Path, remote: str) -> dict:
    """Checkpoints 5 and 10 on the remote; returns the state as of step 5."""
    state = {"n": 0, "hist": []}
    at5: dict = {}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "train", remote=remote, every_steps=5) as ckpt:
        for step in ckpt.steps(10):
            state["n"] += 1
            state["hist"] = state["hist"] + [step]
            if step == 4:
                at5.update(n=state["n"] + 0, hist=list(state["hist"]))
            assert ckpt.flush(30)
    return at5


_TRAINED: dict[str, tuple[str, dict]] = {}


def trained_bucket(s3: S3Server, tmp_path: Path) -> tuple[str, dict]:
    """A new bucket holding what :func:`trained` leaves on the remote (checkpoints 5 and 10),
    and the state as of step 5. Trained once per server, then copied server-side into each
    new bucket: the same objects, without a training run per case (the suite runs on moto
    and on RGW)."""
    if s3.endpoint not in _TRAINED:
        src = s3.new_bucket()
        _TRAINED[s3.endpoint] = (src, trained(tmp_path / "template", f"s3://{src}/run/"))
    src, at5 = _TRAINED[s3.endpoint]
    bucket, client = s3.new_bucket(), s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=src):
        for o in page.get("Contents", []):
            client.copy_object(Bucket=bucket, Key=o["Key"], CopySource={"Bucket": src, "Key": o["Key"]})
    return bucket, {"n": at5["n"], "hist": list(at5["hist"])}


def canary(tmp_path: Path) -> Path:
    return tmp_path / "outside" / "pwned"


def put(s3: S3Server, bucket: str, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=bucket, Key=key, Body=data)


def manifest_dict(s3: S3Server, bucket: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=bucket, Key=f"run/{D10}/{MANIFEST}")["Body"].read())


def files_with(path: Any, size: Any = None, sha: Any = None) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        f = dict(d["files"][0])
        f["path"] = path
        if size is not None:
            f["size"] = size
        if sha is not None:  # replaces the checksum, whatever its algorithm
            f.pop("xxh3_128", None)
            f["sha256"] = sha
        d["files"] = [f]
    return edit


# name -> edit of the manifest dict (or raw bytes), and the payload key to plant (so that a
# download would succeed if the path were not refused)
CASES: dict[str, Any] = {
    "dotdot": files_with("../../outside/pwned"),
    "nested-dotdot": files_with("a/../../../outside/pwned"),
    "absolute": "ABSOLUTE",
    "backslash": files_with("..\\..\\outside\\pwned"),
    "empty-path": files_with(""),
    "dot-path": files_with("./state.pkl"),
    "manifest-as-payload": files_with(MANIFEST),
    "nul-byte": files_with("state\x00.pkl"),
    "absurd-size": files_with("state.pkl", size=2**62),
    "negative-size": files_with("state.pkl", size=-1),
    "string-size": files_with("state.pkl", size="12"),
    "float-size": files_with("state.pkl", size=1e400),
    "bad-checksum": files_with("state.pkl", sha="zz" * 32),
    "file-and-dir": lambda d: d.update(files=[dict(d["files"][0], path="a"), dict(d["files"][0], path="a/b")]),
    "duplicate": lambda d: d.update(files=[d["files"][0], d["files"][0]]),
    "files-not-list": lambda d: d.update(files={"state.pkl": 1}),
    "unknown-version": lambda d: d.update(format="spotckpt/99"),
    "no-version": lambda d: d.pop("format"),
    "wrong-step": lambda d: d.update(step=11),
    "rank-overflow": lambda d: d.update(rank=1e400),
    "versions-not-dict": lambda d: d.update(versions=7),
    "invalid-json": b'{"format": "spotckpt/1", "step": 10, "files": [',
    "not-an-object": b"[1, 2, 3]",
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "not-utf8": b"\xff\xfe{\x00",
    "empty": b"",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_manifest_is_refused_and_restore_falls_back(tmp_path: Path, s3_server: S3Server, s3_env: dict,
                                                            case: str) -> None:
    bucket, at5 = trained_bucket(s3_server, tmp_path)
    remote = f"s3://{bucket}/run/"
    edit = CASES[case]
    name = manifest_dict(s3_server, bucket)["files"][0]["path"]  # state.pt or state.pkl
    payload = s3_server.client().get_object(Bucket=bucket, Key=f"run/{D10}/{name}")["Body"].read()
    if isinstance(edit, bytes):
        raw = edit
    else:
        d = manifest_dict(s3_server, bucket)
        if edit == "ABSOLUTE":
            edit = files_with(str(canary(tmp_path)))
        edit(d)
        raw = json.dumps(d).encode()
        for f in d["files"] if isinstance(d["files"], list) else []:
            if isinstance(f.get("path"), str) and f["path"] and not ("\0" in f["path"] and s3_server.kind == "rgw"):
                # (RGW refuses a key holding a NUL byte with 400: there the manifest alone is the attack)
                put(s3_server, bucket, f"run/{D10}/{f['path'].lstrip('/')}", payload)
    put(s3_server, bucket, f"run/{D10}/{MANIFEST}", raw)

    state = {"n": -1, "hist": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "new", remote=remote) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5
    q = [e for e in events(tmp_path / "new") if e["event"] == "quarantine"]
    assert q and q[0]["step"] == 10 and q[0]["error"].startswith("spotckpt:"), q
    assert "\n" not in q[0]["error"]
    assert not canary(tmp_path).exists()
    assert not [p for p in tmp_path.rglob("pwned")]
    keys = RemoteStore(remote).find()
    assert f"{D10}/{MANIFEST}.quarantined" in keys and f"{D10}/{name}" in keys  # kept, not deleted


def test_manifest_name_used_as_a_dir_is_not_a_checkpoint(tmp_path: Path, s3_server: S3Server,
                                                          s3_env: dict) -> None:
    """Regression: a key ``step-N/MANIFEST.json/x`` made step N look committed, and restore
    then failed with 'does the bucket exist?' instead of using the older checkpoint."""
    bucket, at5 = trained_bucket(s3_server, tmp_path)
    remote = f"s3://{bucket}/run/"
    put(s3_server, bucket, f"run/{step_dirname(20)}/{MANIFEST}/x", b"not a manifest")
    assert RemoteStore(remote).committed() == [5, 10]
    s3_server.client().delete_object(Bucket=bucket, Key=f"run/{D10}/{MANIFEST}")
    state = {"n": -1, "hist": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "new", remote=remote) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5


def test_missing_remote_payload_falls_back(tmp_path: Path, s3_server: S3Server, s3_env: dict) -> None:
    """A manifest whose payload object is gone (a lifecycle rule, a manual delete) is a
    damaged checkpoint like any other: quarantine it and restore the older one."""
    bucket, at5 = trained_bucket(s3_server, tmp_path)
    remote = f"s3://{bucket}/run/"
    name = manifest_dict(s3_server, bucket)["files"][0]["path"]
    s3_server.client().delete_object(Bucket=bucket, Key=f"run/{D10}/{name}")
    state = {"n": -1, "hist": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "new", remote=remote) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5


def test_oversized_remote_payload_is_not_downloaded(tmp_path: Path, s3_server: S3Server, s3_env: dict) -> None:
    """An object larger than its manifest says is refused by size before any byte is
    downloaded, so a hostile or damaged remote cannot fill the local disk."""
    bucket, at5 = trained_bucket(s3_server, tmp_path)
    remote = f"s3://{bucket}/run/"
    name = manifest_dict(s3_server, bucket)["files"][0]["path"]
    put(s3_server, bucket, f"run/{D10}/{name}", b"\0" * (8 << 20))
    state = {"n": -1, "hist": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "new", remote=remote) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5
    written = sum(p.stat().st_size for p in (tmp_path / "new").rglob("*") if p.is_file())
    assert written < 1 << 20, written
    ev = [e for e in events(tmp_path / "new") if e["event"] == "quarantine"]
    assert ev and "bytes, its manifest says" in ev[0]["error"]


def test_symlinked_payload_on_a_file_remote_is_refused(tmp_path: Path) -> None:
    remote_dir = tmp_path / "remote"
    remote = f"file://{remote_dir}/"
    at5 = trained(tmp_path, remote)
    secret = tmp_path / "secret.bin"
    real = remote_dir / D10 / json.loads((remote_dir / D10 / MANIFEST).read_text())["files"][0]["path"]
    secret.write_bytes(real.read_bytes())  # same bytes, so only the link itself is wrong
    real.unlink()
    real.symlink_to(secret)
    state = {"n": -1, "hist": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "new", remote=remote) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5
    q = [e for e in events(tmp_path / "new") if e["event"] == "quarantine"]
    assert q and "symlink" in q[0]["error"]


@pytest.mark.parametrize("key", ["run/../escape.txt", "run/sub/../../escape.txt", "run/./x/../../escape.txt"])
def test_object_keys_escaping_the_prefix_are_refused(tmp_path: Path, s3_server: S3Server, s3_env: dict,
                                                     key: str, caplog: pytest.LogCaptureFixture) -> None:
    """A foreign object is never written anywhere; a file set naming an escaping path or key
    is refused as unreadable (the older set is used)."""
    bucket = s3_server.new_bucket()
    put(s3_server, bucket, key, b"hostile")
    put(s3_server, bucket, "run/ok.txt", b"fine")
    store = RemoteStore(f"s3://{bucket}/run/")
    local = LocalDir(tmp_path / "deep" / "local")
    local.root.mkdir(parents=True)
    with caplog.at_level("WARNING", logger="spotckpt"):
        fs, got, _ = restore_files(local, store)
    assert fs is None and got == [] and "not spotckpt's" in caplog.text
    rel = key.split("/", 1)[1]
    entry = {"path": rel, "size": 7, "xxh3": "0" * 32, "mtime_ns": 1, "key": f"files/v/{rel}"}
    for e in (entry, dict(entry, path="ok.txt", key=f"files/v/{rel}")):
        put(s3_server, bucket, "run/files/SET-000000000001.json",
            json.dumps({"format": "spotckpt-files/1", "seq": 1, "created": 0, "entries": [e]}).encode())
        with caplog.at_level("WARNING", logger="spotckpt"):
            fs, got, _ = restore_files(local, store)
        assert fs is None and got == [] and "unsafe path" in caplog.text
    assert not list(tmp_path.rglob("escape.txt"))


class _RunsCode:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("serializer", ["torch", "pickle-safe"])
def test_payload_that_would_run_code_does_not_load(tmp_path: Path, s3_server: S3Server, s3_env: dict,
                                                   serializer: str) -> None:
    """A remote checkpoint whose manifest is valid (sizes and checksums match) but whose
    payload is a pickle that runs code: loading fails, the code never runs."""
    import hashlib

    bucket, _ = trained_bucket(s3_server, tmp_path)
    remote = f"s3://{bucket}/run/"
    marker = tmp_path / "code-ran"
    evil = {"n": _RunsCode(marker), "hist": []}
    name = "state.pt" if serializer == "torch" else "state.pkl"
    f = tmp_path / name
    if serializer == "torch":
        import torch

        torch.save(evil, f)
    else:
        f.write_bytes(pickle.dumps(evil))
    data = f.read_bytes()
    d = manifest_dict(s3_server, bucket)
    d["serializer"] = serializer
    d["files"] = [{"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    put(s3_server, bucket, f"run/{D10}/{name}", data)
    put(s3_server, bucket, f"run/{D10}/{MANIFEST}", json.dumps(d).encode())
    with pytest.raises(spotckpt.CorruptCheckpointError) as ei:
        with spotckpt.Checkpointer({"n": 0, "hist": []}, local_dir=tmp_path / "new", remote=remote):
            pass
    assert "spotckpt" in str(ei.value) and "\n" not in str(ei.value)
    assert not marker.exists()


PLAIN = {"empty-bytes": b"", "frozenset": frozenset({1, 2}), "range": range(3), "slice": slice(1, 5),
         "numpy-array": "np.arange(6, dtype=np.float32).reshape(2, 3)", "numpy-scalar": "np.float64(0.25)",
         "numpy-int": "np.int64(7)", "numpy-strings": "np.array(['a', 'bc'])"}


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_values_restore_under_weights_only(tmp_path: Path, name: str) -> None:
    """Regression: with torch imported (so saved by torch.save, loaded weights_only=True), a
    state holding a numpy array or scalar, a frozenset, a range, a slice or b"" was saved but
    could never be restored ("Unsupported global"), so the job could not resume."""
    import numpy as np
    import torch  # noqa: F401 - selects the torch serializer

    value = eval(PLAIN[name]) if isinstance(PLAIN[name], str) else PLAIN[name]
    with spotckpt.Checkpointer({"v": value}, local_dir=tmp_path, remote=None) as ckpt:
        ckpt.save(blocking=True)
    state = {"v": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path, remote=None) as ckpt:
        assert ckpt.restored_step == 0
    assert type(state["v"]) is type(value)
    assert np.array_equal(state["v"], value) if isinstance(value, np.ndarray) else state["v"] == value


def test_a_manifest_that_lies_about_its_size_is_quarantined_not_a_free_space_error(
        tmp_path: Path, s3_server: S3Server, s3_env: dict) -> None:
    """Issue 26, item 13: a payload size edited to 10 TB (below the 16 TiB bound) stopped every
    start with a "free space" error, because the free-space check trusted the manifest before
    the object's real size was compared: the step was never quarantined and the intact older
    step never used. The sizes are compared first now."""
    bucket, at5 = trained_bucket(s3_server, tmp_path)
    remote = f"s3://{bucket}/run/"
    d = manifest_dict(s3_server, bucket)
    d["files"][0]["size"] = 10 * 10**12
    put(s3_server, bucket, f"run/{D10}/{MANIFEST}", json.dumps(d).encode())
    state = {"n": -1, "hist": None}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "new", remote=remote) as ckpt:
        assert ckpt.restored_step == 5
    assert state == at5
    q = [e for e in events(tmp_path / "new") if e["event"] == "quarantine"]
    assert q and q[0]["step"] == 10 and "its manifest says 10000000000000" in q[0]["error"], q
    assert f"{D10}/{MANIFEST}.quarantined" in RemoteStore(remote).find()
