"""Performance properties that hold on any machine (the ratios live in bench/ and BENCHMARKS.md).

- Nothing unchanged is uploaded again: not the free-form files of an unchanged tree, not a
  checkpoint already durable, not a payload that was streamed while it was written. Counted
  at the S3 server (moto's request recorder), not in our own code.
- The training thread's stall in ``save()`` does not grow with the upload time: with the
  uploads throttled to a crawl, saves cost what they cost with a fast remote.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest
from conftest import S3Server, start_moto
from throttle_proxy import ThrottleProxy

import spotckpt

torch = pytest.importorskip("torch")
MiB = 1 << 20


@pytest.fixture(scope="module")
def recorded_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Path]]:
    """A moto server of our own whose request recorder writes into a temp dir."""
    rec = tmp_path_factory.mktemp("moto") / "recording.jsonl"
    old = os.environ.get("MOTO_RECORDER_FILEPATH")
    os.environ["MOTO_RECORDER_FILEPATH"] = str(rec)
    try:
        server = start_moto()
    finally:
        if old is None:
            os.environ.pop("MOTO_RECORDER_FILEPATH")
        else:
            os.environ["MOTO_RECORDER_FILEPATH"] = old
    try:
        yield server, rec
    finally:
        assert server.proc is not None
        server.stop()


class Recording:
    def __init__(self, server: S3Server) -> None:
        self.server = server

    def _api(self, what: str) -> str:
        req = urllib.request.Request(f"{self.server.endpoint}/moto-api/recorder/{what}", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()

    def __enter__(self) -> Recording:
        self._api("reset-recording")
        self._api("start-recording")
        self.requests: list[tuple[str, str, dict]] = []
        return self

    def __exit__(self, *exc: object) -> None:
        self._api("stop-recording")
        # one JSON document per request; moto's recorder appends them from several threads,
        # so two concurrent requests can land on one line (seen with parallel part uploads)
        text, dec, i = self._api("download-recording"), json.JSONDecoder(), 0
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                break
            r, i = dec.raw_decode(text, i)
            self.requests.append((r["method"], urlparse(r["url"]).path, r.get("headers", {})))

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests if m in ("PUT", "POST", "DELETE")]


@pytest.fixture
def env(recorded_s3: tuple[S3Server, Path], monkeypatch: pytest.MonkeyPatch) -> S3Server:
    server, _ = recorded_s3
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return server


@pytest.mark.slow
def test_nothing_unchanged_is_uploaded_again(tmp_path: Path, env: S3Server) -> None:
    bucket = env.new_bucket()
    remote = f"s3://{bucket}/run/"
    local = tmp_path / "ckpt"
    for i in range(200):
        f = local / "logs" / f"d{i // 50}" / f"f{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * (i + 1))
    state = {"w": torch.rand(5 * MiB)}  # 20 MiB: more than one upload part, so it is streamed
    with spotckpt.Checkpointer(state, local_dir=local, remote=remote) as ck:
        with Recording(env) as first:
            for _ in ck.steps(total=3):
                pass
            assert ck.flush(60)
        step = ck.step
        with Recording(env) as idle:
            assert ck.flush(30)  # a full mirror pass over an unchanged tree
            time.sleep(2.5)      # and the Syncer's own idle passes
        assert idle.requests == []
        (local / "logs" / "d0" / "f0.txt").write_bytes(b"changed")
        with Recording(env) as one:
            assert ck.flush(30)
        # the new version (under a fresh key), the file set naming it, one bulk delete of
        # the superseded version and set: nothing else of the 200 files goes up again
        puts = sorted((p for m, p in one.writes() if m == "PUT"), key=lambda p: "/SET-" not in p)
        assert len(puts) == 2 and puts[0].startswith(f"/{bucket}/run/files/SET-"), puts
        assert puts[1].startswith(f"/{bucket}/run/files/") and puts[1].endswith("/logs/d0/f0.txt")
        assert [p for m, p in one.writes() if m != "PUT"] == [f"/{bucket}"]
    # The payload went up once, part by part while it was written; the Syncer only confirmed it.
    key = f"/{bucket}/run/step-{step:012d}/state.pt"
    parts = [h for m, p, h in first.requests if p == key and m == "PUT"]
    assert len(parts) == 2, [(m, p) for m, p, _ in first.requests]  # no second whole-file upload
    size = (local / f"step-{step:012d}" / "state.pt").stat().st_size
    assert sum(int(h.get("Content-Length", 0)) for h in parts) == size

    # A restart on the same dir: the checkpoint is durable and the files are mirrored.
    with Recording(env) as restart:
        with spotckpt.Checkpointer({"w": torch.zeros(1)}, local_dir=local, remote=remote) as ck:
            assert ck.restored_step == step
            assert ck.flush(30)
    # (the start's write probe and its generation claim, gen/<G>, are not uploads)
    assert [w for w in restart.writes() if "/.spotckpt-probe-" not in w[1] and "/run/gen/" not in w[1]] == []


def test_small_checkpoint_is_two_puts_and_no_payload_head(tmp_path: Path, env: S3Server) -> None:
    """A checkpoint within one part costs the protocol's minimum on the critical path: the
    payload PUT and the manifest PUT. The PUT's echoed CRC32 confirms the payload, so no HEAD
    of it follows (bench/ row 6)."""
    bucket = env.new_bucket()
    state = {"w": torch.rand(64 * 1024)}  # 256 KiB
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "ck", remote=f"s3://{bucket}/run/") as ck:
        it = ck.steps(total=10)
        next(it)
        ck.save()
        assert ck.flush(60)
        for _ in range(2):
            next(it)
            with Recording(env) as rec:
                ck.save()
                assert ck.flush(60)
            d = f"/{bucket}/run/step-{ck.step:012d}"
            mine = [(m, p) for m, p, _ in rec.requests if p.startswith(d + "/")]
            assert [x for x in mine if x[0] == "PUT"] == [("PUT", f"{d}/state.pt"), ("PUT", f"{d}/MANIFEST.json")], mine
            assert ("HEAD", f"{d}/state.pt") not in mine, mine
        it.close()
        payload = tmp_path / "ck" / f"step-{ck.step:012d}" / "state.pt"
    # The Syncer's own upload (not streamed) of a file within one part: one PUT, no HEAD.
    from spotckpt._remote._store import RemoteStore

    store = RemoteStore(f"s3://{bucket}/other/")
    with Recording(env) as rec:
        assert store.put_file(payload, "state.pt") == payload.stat().st_size
    assert [(m, p) for m, p, _ in rec.requests] == [("PUT", f"/{bucket}/other/state.pt")]


def _stalls(ck: spotckpt.Checkpointer, n: int, *, settle: bool) -> list[float]:
    out = []
    it = ck.steps(total=ck.step + n + 1)
    for _ in range(n):
        next(it)
        if settle:
            assert ck.flush(60)
        t = time.perf_counter()
        ck.save()
        out.append(time.perf_counter() - t)
    it.close()
    return out


@pytest.mark.slow
def test_save_stall_does_not_grow_with_upload_time(tmp_path: Path, env: S3Server,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"w": torch.rand(2 * MiB)}  # 8 MiB
    bucket = env.new_bucket()
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "fast", remote=f"s3://{bucket}/fast/") as ck:
        fast = _stalls(ck, 4, settle=True)[1:]  # the first save allocates the snapshot buffers
    u = urlparse(env.endpoint)
    proxy = ThrottleProxy((u.hostname, u.port), up_bps=2 * MiB)  # one 8 MiB upload: >= 4 s
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        with spotckpt.Checkpointer(state, local_dir=tmp_path / "slow", remote=f"s3://{bucket}/slow/",
                                   grace_seconds=120) as ck:
            t0 = time.perf_counter()
            slow = _stalls(ck, 4, settle=False)[1:]
            saving = time.perf_counter() - t0
            assert ck.durable_step is None  # the uploads really were still running
            assert ck.flush(120)
            upload = time.perf_counter() - t0
    finally:
        proxy.close()
    assert upload > 3.0, upload
    assert saving < upload / 2
    assert statistics.median(slow) < statistics.median(fast) + 0.25, (slow, fast)
    assert max(slow) < 1.0, (slow, upload)  # each upload took seconds


_FIRST_BYTE = r"""
import json, sys
import boto3, torch  # imported before, as a script would; what open() imports is the point
import spotckpt
from spotckpt._remote import _s3fast
seen = {}
orig = _s3fast.S3Fast.get_file
def get_file(self, *a, **k):
    seen.setdefault("modules", sorted(m for m in ("s3fs", "aiobotocore", "aiohttp", "fsspec") if m in sys.modules))
    return orig(self, *a, **k)
_s3fast.S3Fast.get_file = get_file
state = {"w": torch.zeros(1)}
with spotckpt.Checkpointer(state, local_dir=sys.argv[1], remote=sys.argv[2]) as ck:
    seen["step"] = ck.restored_step
    seen["ok"] = bool(state["w"].numel() == 2 * 1024 * 1024)
print("SEEN " + json.dumps(seen))
"""


def test_restore_first_byte_waits_for_nothing_needless(tmp_path: Path, env: S3Server) -> None:
    """A restore from ``s3://`` on an empty dir reaches the payload's first GET through one
    boto3 client alone: no s3fs (nor its aiobotocore/aiohttp stack) imported by then, and no
    request beyond the write probe, one listing, the manifest and one size check (bench/
    peers: s3fs's import and first request cost ~0.4 s of a 64 MiB restore; a second HEAD
    of the payload another round trip)."""
    import subprocess
    import sys

    bucket = env.new_bucket()
    remote = f"s3://{bucket}/run/"
    with spotckpt.Checkpointer({"w": torch.rand(2 * MiB)}, local_dir=tmp_path / "a", remote=remote) as ck:
        ck.save()
        assert ck.flush(60)
        step = ck.step
    with Recording(env) as rec:
        out = subprocess.run([sys.executable, "-c", _FIRST_BYTE, str(tmp_path / "b"), remote],
                             env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("SEEN "))[5:])
    assert seen["step"] == step and seen["ok"], seen
    assert seen["modules"] == [], seen  # s3fs and its async stack: not needed before the first byte
    payload = f"/{bucket}/run/step-{step:012d}/state.pt"
    first = next(i for i, (m, p, _) in enumerate(rec.requests) if m == "GET" and p == payload)
    before = [(m, p.replace(f"/{bucket}/run/", "")) for m, p, _ in rec.requests[:first]]
    # The generation claim (issues 13, 26): a listing of gen/, the newest claim's body, the
    # conditional create, and the refused re-create that proves the store enforces it.
    # Nothing else before the first byte (a prune comes every 4th start only).
    claim = before[2:6]
    assert [m for m, _ in claim] == ["GET", "GET", "PUT", "PUT"] and claim[2] == claim[3], before
    assert claim[1] == ("GET", "gen/000000000001") and claim[2] == ("PUT", "gen/000000000002"), before
    before = before[:2] + before[6:]
    assert len(before) == 5, before
    assert [m for m, _ in before] == ["PUT", "DELETE", "GET", "GET", "HEAD"], before
    assert before[1][1] == before[0][1] and ".spotckpt-probe-" in before[0][1], before  # the probe
    assert before[3:] == [("GET", f"step-{step:012d}/MANIFEST.json"), ("HEAD", f"step-{step:012d}/state.pt")]
