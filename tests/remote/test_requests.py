"""The requests a save and a restore send (issue 25, item 4): none that can be known in advance.

A counting proxy on loopback (``faultproxy.FaultProxy`` with no faults) sits between
spotckpt and the S3 test server and records every request with when it arrived and when
it was answered. A save of a 64 MiB state sends its payload parts and its manifest, one
listing to prove its generation is the newest (kept: see docs/concepts.md "Generations")
and nothing else a save could have known without asking (no HEAD of what it just uploaded,
no listing of what it just committed); a restore waits through at most 3 round trips before
its first payload byte (no write probe, no HEAD: the manifest has the size; one GET for a
payload under the range size).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import S3Server
from faultproxy import FaultProxy, chain

import spotckpt

torch = pytest.importorskip("torch")

MiB = 1 << 20
pytestmark = pytest.mark.slow  # 64 MiB through moto, four times


def _state(fill: float) -> dict:
    return {"w": torch.full((64 * MiB // 4,), fill)}


def _payload(path: str) -> bool:
    """A request of a checkpoint's payload (not its manifest, not gen/, not the watched dir)."""
    return re.search(r"/step-\d+/", path) is not None and "MANIFEST.json" not in path


def _show(spans: list) -> str:
    return "\n".join(f"{m} {p[:120]}" for m, p, *_ in spans)


def test_a_64mib_save_and_restore_send_only_what_they_cannot_know(tmp_path: Path, s3_server: S3Server,
                                                                 s3_env: dict, figure) -> None:
    remote = f"s3://{s3_server.new_bucket()}/run/"
    with FaultProxy(s3_server.endpoint, rate=0.0) as proxy:
        opts = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
        state = _state(1.0)
        per_save = []
        with spotckpt.Checkpointer(state, local_dir=tmp_path / "a", remote=remote, keep_last=1,
                                   storage_options=opts, every_steps=10**9) as ck:
            for step in (1, 2, 3):
                proxy.spans.clear()
                ck.step = step
                ck.save()
                assert ck.flush(300), ck.last_error
                spans = list(proxy.spans)
                per_save.append(spans)
        for spans in per_save[1:]:  # the first save also looks at the empty watched dir once
            other = [s for s in spans if not _payload(s[1]) and "/files/" not in s[1]
                     and not s[1].endswith("?delete")]
            # the manifest PUT and the stale check's listing of gen/; no HEAD, no listing of step-*
            assert sorted(m for m, *_ in other) == ["GET", "PUT"], _show(spans)
            assert not any(m == "HEAD" for m, *_ in spans), _show(spans)
            deletes = [s for s in spans if s[1].endswith("?delete")]
            # retention, after the commit: the old manifests in one DeleteObjects, then their
            # payload in one more (un-commit first: a crash between never leaves a manifest
            # whose payload is gone)
            assert len(deletes) <= 2, _show(spans)
        save_n = len(per_save[-1])

        proxy.spans.clear()
        restored = _state(0.0)
        with spotckpt.Checkpointer(restored, local_dir=tmp_path / "b", remote=remote,
                                   storage_options=opts) as ck2:
            assert ck2.restored_step == 3
        assert torch.equal(restored["w"], state["w"])
        spans = list(proxy.spans)
        # Three threads send these: the generation claim (gen/), the restore (step-*/) and,
        # beside them, the watched dir's files (run/, files/). The payload waits for the
        # first two; each one's requests follow one another, so the round trips it waited
        # through are the longer of their two chains (a chain across all requests would link
        # requests of different threads that merely happened one after the other).
        until = lambda m, p: m == "GET" and _payload(p)  # noqa: E731
        gen = [x for x in spans if "gen%2F" in x[1] or "/gen/" in x[1] or until(x[0], x[1])]
        own = [x for x in spans if not ("gen%2F" in x[1] or "/gen/" in x[1]) and "files" not in x[1]
               and not x[1].endswith("prefix=run%2F&encoding-type=url")]
        path = max(chain(gen, until), chain(own, until), key=len)
        assert len(path) <= 3, "\n".join(path) + "\n--- all:\n" + _show(spans)
        assert not any(m in ("HEAD", "DELETE") for m, *_ in spans), _show(spans)  # no probe, no HEAD
        payload_gets = [s for s in spans if s[0] == "GET" and _payload(s[1])]
        assert len(payload_gets) == 1, _show(spans)  # 64 MiB and a header: one GET
    figure(f"[requests] 64 MiB: a save sends {save_n} requests (payload parts, manifest, gen/ check, "
           f"retention), a restore waits through {len(path)} round trips before its first payload byte")


def test_a_read_only_remote_stops_the_start_in_one_line_without_a_probe(tmp_path: Path, s3_server: S3Server,
                                                                        s3_env: dict) -> None:
    """No write probe: the generation claim is the start's first write, beside the restore. A
    remote that refuses writes stops the start with the claim's error, naming the remote and
    what to check, and the checkpoint's payload is not downloaded for nothing."""
    remote = f"s3://{s3_server.new_bucket()}/run/"
    with spotckpt.Checkpointer({"w": torch.ones(1 << 18)}, local_dir=tmp_path / "a", remote=remote) as ck:
        ck.save()
        assert ck.flush(60), ck.last_error
    with FaultProxy(s3_server.endpoint, rate=1.0, kinds=("leak",), match=lambda m, p: m == "PUT") as proxy:
        with pytest.raises(spotckpt.SpotckptError) as ei:
            with spotckpt.Checkpointer({"w": torch.zeros(1 << 18)}, local_dir=tmp_path / "b", remote=remote,
                                       storage_options={"client_kwargs": {"endpoint_url": proxy.endpoint}}):
                pass
        msg = str(ei.value)
        assert "gen/" in msg and "check AWS credentials" in msg and "\n" not in msg, msg
        assert not any(m == "PUT" and ".spotckpt-probe-" in p for m, p, _ in proxy.log), proxy.log
        assert not any(m == "GET" and _payload(p) for m, p, _ in proxy.log), proxy.log
