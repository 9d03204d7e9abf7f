"""S3 faults: a fault-injecting proxy on loopback between spotckpt and the S3 test server.

HTTP 500 InternalError, 503 SlowDown, connection resets (before and after the server
applied the request), stalls and truncated bodies, on a share of all requests. Uploads and
restores must complete through retries with nothing lost; once the retry budget runs out
the error names the remote and the last cause, quickly, and the local checkpoint stays
intact for the next attempt.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

import spotckpt
from chaoslib import events, remote_audit
from conftest import S3Server
from faultproxy import KINDS, FaultProxy
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import verify_dir

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

# steps per run: 6 in `make test`, more in `make chaos`
STEPS = 6 if int(os.environ.get("SPOTCKPT_CHAOS_ITERATIONS", "50")) <= 50 else 18


def options(proxy: FaultProxy) -> dict:
    # short timeouts so a stall costs a second, not s3fs's default 15 s
    return {"client_kwargs": {"endpoint_url": proxy.endpoint},
            "config_kwargs": {"read_timeout": 1, "connect_timeout": 1}}


def make_state(seed: int) -> dict:
    rng = random.Random(seed)
    return {"blob": rng.randbytes(300_000), "n": 0, "hist": []}


def train(state: dict, local: Path, remote: str, proxy: FaultProxy, total: int) -> spotckpt.Checkpointer:
    with spotckpt.Checkpointer(state, local_dir=local, remote=remote, every_steps=3, keep_last=2,
                               storage_options=options(proxy)) as ckpt:
        for step in ckpt.steps(total):
            state["n"] += 1
            state["hist"] = state["hist"] + [step]
            if (step + 1) % 3 == 0:
                assert ckpt.flush(120), ckpt.last_error
    return ckpt


@pytest.mark.parametrize("kinds", [(k,) for k in KINDS] + [KINDS], ids=list(KINDS) + ["all"])
def test_uploads_and_restores_complete_through_faults(tmp_path: Path, s3_server: S3Server, s3_env: dict,
                                                     kinds: tuple[str, ...], figure) -> None:
    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/run/"
    t0 = time.monotonic()
    with FaultProxy(s3_server.endpoint, rate=0.3, kinds=kinds, stall_seconds=2.5, seed=sum(map(ord, "".join(kinds)))) as proxy:
        state = make_state(1)
        ckpt = train(state, tmp_path / "a", remote, proxy, STEPS)
        assert ckpt.durable_step == STEPS
        committed, orphans = remote_audit(s3_server, bucket, "run/")  # straight to the server
        assert committed[-1] == STEPS and len(committed) <= 2 and orphans == 0, committed
        # a new machine restores through the same faults
        state2 = make_state(2)
        with spotckpt.Checkpointer(state2, local_dir=tmp_path / "b", remote=remote,
                                   storage_options=options(proxy)) as ckpt2:
            assert ckpt2.restored_step == STEPS
        assert state2 == state
        assert not any(e["event"] == "quarantine" for e in events(tmp_path / "b"))
        assert sum(proxy.faults.values()) >= 3, proxy.faults  # the faults did happen
    figure(f"[faults] S3 {'+'.join(kinds)} on 30% of requests: {proxy.requests} requests, "
           f"{dict(proxy.faults)} injected, {STEPS} steps saved and restored, 0 lost, "
           f"{time.monotonic() - t0:.1f} s")


def test_retry_budget_exhausted_clear_error_local_intact(tmp_path: Path, s3_server: S3Server, s3_env: dict,
                                                          figure) -> None:
    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/run/"
    local = tmp_path / "a"
    with FaultProxy(s3_server.endpoint, rate=0.0, kinds=("503",)) as proxy:
        state = {"n": 0}
        with spotckpt.Checkpointer(state, local_dir=local, remote=remote, every_steps=3,
                                   storage_options=options(proxy)) as ckpt:
            for step in ckpt.steps(3):
                state["n"] += 1
            ckpt.save(blocking=True)
            assert ckpt.flush(30)
            proxy.set(rate=1.0)  # S3 now answers 503 SlowDown to everything
            state["n"] = 41
            ckpt.step = 4
            ckpt.save(blocking=True)
            t0 = time.monotonic()
            assert not ckpt.flush(120)
            waited = time.monotonic() - t0
            err = ckpt.last_error
            assert isinstance(err, spotckpt.RemoteError), err
            msg = str(err)
            assert remote in msg and "\n" not in msg, msg
            assert "503" in msg or "SlowDown" in msg or "reduce your request rate" in msg, msg
            assert waited < 30, f"the retry budget took {waited:.0f} s to run out"
            # the local checkpoint is intact, and the next attempt makes it durable
            lo = LocalDir(local)
            assert 4 in lo.committed()
            verify_dir(lo.path(4), lo.read_manifest(4))
            proxy.set(rate=0.0)
            assert ckpt.flush(60), ckpt.last_error
        assert remote_audit(s3_server, bucket, "run/")[0][-1] == 4
        # a restore that cannot reach S3 fails fast with the same kind of error, writing nothing
        proxy.set(rate=1.0, kinds=("500", "reset"))
        t1 = time.monotonic()
        with pytest.raises(spotckpt.RemoteError) as ei:
            with spotckpt.Checkpointer({"n": 0}, local_dir=tmp_path / "b", remote=remote,
                                       storage_options=options(proxy)):
                pass
        failed_after = time.monotonic() - t1
        assert remote in str(ei.value) and failed_after < 30, (str(ei.value), failed_after)
        assert not [p for p in (tmp_path / "b").iterdir() if not p.name.startswith(".spotckpt")]
    figure(f"[faults] S3 answering 503 to every request: upload gave up after {waited:.1f} s with "
           f"'{msg[:160]}...'; local step 4 intact and durable on the next attempt; "
           f"restore gave up after {failed_after:.1f} s")
