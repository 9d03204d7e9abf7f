"""The deadline-aware flush planner, in a unit test and against a throttled S3 path."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import REPO, run_env
from spotckpt._commit._local import LocalDir
from spotckpt._notices._planner import FlushPlanner
from spotckpt._remote._store import RemoteStore
from throttle_proxy import ThrottleProxy


def test_decisions() -> None:
    p = FlushPlanner()
    assert p.decide(10, unsaved_work=True, undurable_commit=False).action == "save"  # no data yet
    p.record_save(0.1, 0.4, 100 * 2**20)
    p.record_upload(100 * 2**20, 10.0)  # 10 MiB/s
    est = p.estimate()
    assert est is not None and 10.5 < est < 15
    assert p.decide(30, unsaved_work=True, undurable_commit=True).action == "save"
    assert p.decide(5, unsaved_work=True, undurable_commit=True).action == "finish-upload"
    assert p.decide(5, unsaved_work=True, undurable_commit=False).action == "nothing"
    assert p.decide(5, unsaved_work=False, undurable_commit=True).action == "finish-upload"
    p.record_upload(100 * 2**20, 40.0)  # the link got slower: the estimate follows quickly
    assert p.estimate() > 2 * est
    local_only = FlushPlanner(uploads=False)
    local_only.record_save(0.1, 0.4, 10**9)
    assert local_only.estimate() == pytest.approx(0.5 * 1.25 + 0.5)


def _events(local: Path) -> list[dict]:
    p = LocalDir(local).meta / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("grace, want", [(6.0, "finish-upload"), (60.0, "save")])
def test_throttled_upload_plan_and_durable_at_deadline(tmp_path: Path, s3_server, s3_remote: str,
                                                      grace: float, want: str) -> None:
    u = urlparse(s3_server.endpoint)
    proxy = ThrottleProxy((u.hostname, u.port), up_bps=1.0 * 2**20)  # 1 MiB/s uploads
    local = tmp_path / "ck"
    try:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "scripts" / "big_state_train.py"), "--mb", "5"],
            env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=s3_remote,
                        SPOTCKPT_GRACE_SECONDS=str(grace), AWS_ENDPOINT_URL_S3=proxy.url),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # wait until one upload has been measured and the next one is under way, then
        # interrupt it midway: 5 MiB at 1 MiB/s take ~5 s, so ~3 s of it are left
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ev = _events(local)
            done = [e["step"] for e in ev if e["event"] == "upload_done"]
            started = [e["step"] for e in ev if e["event"] == "upload_start"]
            if done and started and max(started) > max(done):
                break
            time.sleep(0.05)
        else:
            proc.kill()
            raise AssertionError("no measured upload within 60 s: " + proc.communicate()[0])
        time.sleep(2.0)
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t_sig
    finally:
        proxy.close()
    assert proc.returncode == 143, out
    ev = _events(local)
    plan = next(e for e in ev if e["event"] == "plan")
    flush = next(e for e in ev if e["event"] == "flush")
    assert plan["action"] == want, plan
    assert flush["durable"] is True, flush
    committed = RemoteStore(s3_remote).committed()
    assert flush["durable_step"] in committed
    # `spotckpt status` shows the planner's estimate and what the last interruption did
    st = subprocess.run([sys.executable, "-m", "spotckpt", "status", "--json", "--local-dir", str(local),
                         "--remote", s3_remote], env=run_env(), capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["flush_estimate_seconds"] > 0
    assert doc["last_interruption_flush"]["action"] == want
    if want == "finish-upload":
        assert elapsed < grace + 1.0  # a durable checkpoint existed at the deadline
        assert flush["durable_step"] < flush["step"]  # the older checkpoint, as planned
    else:
        assert flush["durable_step"] == flush["step"]
