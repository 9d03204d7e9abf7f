"""Hostile remote content in every prefix spotckpt lists, generated (issue 26, the family;
``gen/`` is tests/remote/test_fencing.py's): step checkpoints ``step-N/``, the watched dir's
objects ``files/`` and file sets ``files/SET-*.json``, named lineages ``ckpt-<name>/``.

Each example copies one trained remote (checkpoints 5 and 10, two watched files, a named
lineage ``aux`` with its own 5 and 10) and plants 1-3 generated things: junk keys (any name,
any bytes, huge step and set numbers, wrong widths), damaged manifests and sets (cut short,
not JSON, sizes that lie, a checksum or a number changed). Then, as a user would:

- ``spotckpt verify`` exits 1 exactly when a checkpoint, the newest file set or a file a
  restore would read is damaged (0 for junk beside them);
- a start (the unnamed lineage with its mirror, then ``aux``) restores the newest intact
  checkpoint and files, refuses the damaged ones, and writes nothing outside its dir;
- afterwards every planted key of a shape spotckpt never writes is still there, byte for
  byte, and every damaged manifest or set is kept (in place or quarantined), never deleted.

On moto and RGW; plus 1,001+ keys in each prefix (listing pages, bulk deletes).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import S3Server
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import spotckpt
from spotckpt._remote._store import RemoteStore
from spotckpt.cli._main import main

D5, D10 = "step-000000000005", "step-000000000010"
FILES = {"a.txt": b"alpha, the watched dir's first file", "sub/b.bin": bytes(range(256)) * 12}


@dataclasses.dataclass
class Template:
    bucket: str
    keys: list[str]


_TEMPLATES: dict[str, Template] = {}


def template(s3: S3Server, tmp: Path) -> Template:
    """Trained once per server: the unnamed lineage (steps 5, 10 and FILES) and ``aux``."""
    if s3.endpoint not in _TEMPLATES:
        bucket = s3.new_bucket()
        remote = f"s3://{bucket}/run/"
        for name in (None, "aux"):
            state = {"n": 0}
            with spotckpt.Checkpointer(state, local_dir=tmp / "template", remote=remote, every_steps=5,
                                       name=name) as ck:
                for s in ck.steps(10):
                    state["n"] = s + 1
                if name is None:
                    for rel, data in FILES.items():
                        (tmp / "template" / rel).parent.mkdir(exist_ok=True)
                        (tmp / "template" / rel).write_bytes(data)
                assert ck.flush(60)
        _TEMPLATES[s3.endpoint] = Template(bucket, sorted(RemoteStore(remote).list_keys()))
    return _TEMPLATES[s3.endpoint]


def copy_of(s3: S3Server, tmp: Path) -> str:
    """A new bucket holding the template's objects (server-side copies); its prefix URL."""
    t = template(s3, tmp)
    bucket, client = s3.new_bucket(), s3.client()
    for k in t.keys:
        client.copy_object(Bucket=bucket, Key=f"run/{k}", CopySource={"Bucket": t.bucket, "Key": f"run/{k}"})
    return f"s3://{bucket}/run/"


# -- what gets planted ----------------------------------------------------------------------------
JUNK_NAME = st.text(st.sampled_from("abcXYZ019-_.~ é"), min_size=1, max_size=12).filter(
    lambda s: s.strip(". ") and not s.startswith("-"))
JUNK_BYTES = st.binary(max_size=64)
# ways to damage a JSON document (a manifest or a file set) so that it can no longer be trusted
DAMAGE = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 0.999)),            # cut short at a fraction
    st.tuples(st.just("garbage"), JUNK_BYTES),                   # not JSON at all
    st.tuples(st.just("size"), st.sampled_from([1, -1, 10 * 10**12, 2**70])),  # a size that lies
    st.tuples(st.just("checksum"), st.just(None)),               # a checksum changed
    st.tuples(st.just("number"), st.sampled_from([1, 10**12])),  # its step/seq number changed
)


def unreadable(how: tuple) -> bool:
    """Whether damage ``how`` leaves a document that does not parse (the others parse and
    name content that fails verification)."""
    return how[0] in ("cut", "garbage", "number") or how == ("size", 2**70)  # (2**70: past the 16 TiB bound)


def damaged(raw: bytes, how: tuple, *, kind: str) -> bytes:
    """``raw`` (a manifest or a set) damaged as ``how`` says: never trustworthy after."""
    what, arg = how
    if what == "cut":
        base = raw.rstrip()
        return base[:int(arg * len(base))]
    if what == "garbage":
        return b"\xff" + arg  # (0xff never starts valid UTF-8 JSON)
    d = json.loads(raw)
    items = d["files"] if kind == "manifest" else d["entries"]
    e = next(x for x in items if "size" in x)
    if what == "size":
        e["size"] = e["size"] + arg if e["size"] + arg >= 0 else e["size"] + 1
    elif what == "checksum":
        k = next(k for k in e if k in ("xxh3_128", "sha256", "xxh3"))
        e[k] = ("0" if e[k][0] != "0" else "1") + e[k][1:]
    else:
        d["step" if kind == "manifest" else "seq"] += arg
    return json.dumps(d).encode()


@dataclasses.dataclass(frozen=True)
class Plant:
    """One planted key: ``key`` under the prefix, from ``base`` (a template key, damaged by
    ``how``) or raw ``data``. ``reads``: what a damaged one hides ("unnamed", "aux", "set",
    or None for junk beside the real state)."""

    key: str
    data: bytes | None = None
    base: str | None = None
    how: tuple | None = None
    reads: str | None = None
    foreign: bool = False  # a shape spotckpt never writes: must survive, byte for byte
    leftover: bool = False  # spotckpt's shape, named by no set: collected by the mirror


def _step(n: int) -> str:
    return f"step-{n:012d}"


@st.composite
def plants(draw: st.DrawFn) -> Plant:
    kind = draw(st.sampled_from(["step-junk", "step-manifest", "step-width", "files-junk", "files-leftover",
                                 "set", "set-junk", "lineage-manifest", "lineage-junk"]))
    name, data = draw(JUNK_NAME), draw(JUNK_BYTES)
    if kind == "step-junk":  # an extra object in a checkpoint's dir, or a dir without a manifest
        return Plant(f"{_step(draw(st.sampled_from([5, 10, 7, 10**12 - 1])))}/{name}", data)
    if kind == "step-manifest":  # a damaged manifest: of the newest step, or of a step above it
        n = draw(st.sampled_from([10, 11, 10**12 - 1]))
        return Plant(f"{_step(n)}/MANIFEST.json", base=f"{D10}/MANIFEST.json", how=draw(DAMAGE),
                     reads="unnamed" if n == 10 else "unnamed-above")
    if kind == "step-width":  # not a 12-digit step: not a checkpoint, somebody else's
        n = draw(st.sampled_from(["step-10", "step-0000000000010", "step-00000000001x", "step-"]))
        return Plant(f"{n}/MANIFEST.json", data, foreign=True)
    if kind == "files-junk":
        return Plant(f"files/{name}", data, foreign=True)
    if kind == "files-leftover":  # of spotckpt's shape, named by no set: a killed run's upload
        return Plant(f"files/{draw(st.text('0123456789abcdef', min_size=16, max_size=16))}/{name}", data,
                     leftover=True)
    if kind == "set":
        return Plant("NEWEST-SET", base="NEWEST-SET", how=draw(DAMAGE), reads="set")
    if kind == "set-junk":  # a file set of a huge number that is not one
        return Plant("files/SET-999999999999.json", data, reads="set-above")
    if kind == "lineage-manifest":
        return Plant(f"ckpt-aux/{D10}/MANIFEST.json", base=f"ckpt-aux/{D10}/MANIFEST.json", how=draw(DAMAGE),
                     reads="aux")
    return Plant(f"ckpt-{draw(st.sampled_from(['', '..', 'x y', 'a' * 70, 'aux']))}/{name}", data, foreign=True)


def plant_all(remote: str, todo: list[Plant]) -> list[tuple[Plant, str, bytes]]:
    """Write the plants; returns (plant, key, bytes planted) for each."""
    store = RemoteStore(remote)
    newest = max(k for k in store.list_keys("files/") if k.startswith("files/SET-"))
    out = []
    for p in todo:
        key = newest if p.key == "NEWEST-SET" else p.key
        if p.base is not None:
            raw = store.cat(newest if p.base == "NEWEST-SET" else p.base)
            data = damaged(raw, p.how, kind="set" if p.reads == "set" else "manifest")
        else:
            assert p.data is not None
            data = p.data
        store.put_bytes(key, data)
        out.append((p, key, data))
    return out


# -- the family ------------------------------------------------------------------------------
_n = itertools.count()


# The same examples every run (derandomize, no database), and no shrinking: a failure is
# reported as generated (shrinking one took over five minutes).
@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(todo=st.lists(plants(), min_size=1, max_size=3, unique_by=lambda p: p.key))
def test_hostile_content_in_every_prefix(tmp_path: Path, s3_server: S3Server, s3_env: dict,
                                         todo: list[Plant]) -> None:
    ex = tmp_path / f"ex{next(_n)}"
    remote = copy_of(s3_server, tmp_path)
    planted = plant_all(remote, todo)
    hides = {p.reads for p in todo}
    local = ex / "local"
    where = ["--local-dir", str(local), "--remote", remote]

    expect_bad = bool(hides & {"unnamed", "unnamed-above", "set", "set-above"})
    assert main(["verify", *where, "--remote-only"]) == (1 if expect_bad else 0), todo

    state = {"n": -1}
    with spotckpt.Checkpointer(state, local_dir=local, remote=remote) as ck:
        assert ck.restored_step == (5 if "unnamed" in hides else 10), (todo, ck.restored_step)
        assert state["n"] == ck.restored_step
        for rel, data in FILES.items():
            if any(p.reads == "set" and unreadable(p.how) for p in todo):
                assert not (local / rel).exists(), (todo, rel)  # the newest set is refused whole
            elif (local / rel).exists():
                assert (local / rel).read_bytes() == data, (todo, rel)
        (local / "after.txt").write_bytes(b"written after the start")
        assert ck.flush(60)
    if "set" not in hides:
        assert all((local / rel).read_bytes() == data for rel, data in FILES.items()), todo
    aux = {"n": -1}
    with spotckpt.Checkpointer(aux, local_dir=local, remote=remote, name="aux") as ck:
        assert ck.restored_step == (5 if "aux" in hides else 10), (todo, ck.restored_step)

    assert main(["ls", *where, "--json"]) == 0  # (hostile lineage names are listed, not fatal)

    store = RemoteStore(remote)
    keys = set(store.list_keys())
    for p, key, data in planted:
        if p.foreign:
            assert store.cat(key) == data, (p, "a key of a shape spotckpt never writes was changed or deleted")
        if p.reads == "set" and not unreadable(p.how):
            # it parses: the file it names that fails verification was refused, never seen
            # locally, so the next set names it still (and verify keeps reporting it)
            bad = json.loads(data)["entries"][0]
            assert bad["key"] in keys and json.loads(store.cat(max(k for k in keys if k.startswith(
                "files/SET-") and k.endswith(".json"))))["entries"][0] == bad, p
        elif p.how is not None or p.reads == "set-above":
            kept = [k for k in keys if k == key or k.startswith(key + ".quarantined")]
            assert any(store.cat(k) == data for k in kept), (p, "damage was deleted, not kept")
        if p.leftover and not hides & {"set", "set-above"}:
            assert key not in keys, (p, "a leftover of spotckpt's was not collected")


# -- 1,001+ keys in each prefix ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_thousand_and_one_keys_in_each_prefix(tmp_path: Path, s3_server: S3Server, s3_env: dict) -> None:
    """Listings past one page (1,000 keys) and bulk deletes past one request: the junk beside
    the state is listed and left alone, spotckpt's own leftovers are all collected."""
    remote = copy_of(s3_server, tmp_path)
    n = 1001
    foreign = [f"files/junk-{i:04d}.csv" for i in range(n)]
    ours = [f"files/{i:016x}/left-{i}.bin" for i in range(n)]
    junk = [f"{D10}/junk-{i:04d}" for i in range(n)] + [f"ckpt-aux/{D5}/junk-{i:04d}" for i in range(n)]
    bucket = remote[len("s3://"):].split("/", 1)[0]
    client = s3_server.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=f"run/{k}", Body=b"x"), foreign + ours + junk))
    assert main(["verify", "--remote-only", "--quick", "--local-dir", str(tmp_path / "v"), "--remote", remote]) == 0
    state = {"n": -1}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "local", remote=remote) as ck:
        assert ck.restored_step == 10 and state["n"] == 10
        assert ck.flush(120)
    with spotckpt.Checkpointer({"n": -1}, local_dir=tmp_path / "local", remote=remote, name="aux") as ck:
        assert ck.restored_step == 10
    keys = set(RemoteStore(remote).list_keys())
    assert set(foreign) <= keys and set(junk[:n]) <= keys, "junk beside the state was deleted"
    assert not set(ours) & keys, f"{len(set(ours) & keys)} leftovers of spotckpt's were not collected"
