"""Secrets: credentials and presigned query strings never appear in logs, events or error
messages. The S3 credentials here are distinctive strings; a proxy makes the server answer
with messages that echo the request's Authorization header and a presigned URL; then every
message, log record, event and file the run wrote is searched for them."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

import spotckpt
from conftest import REPO, S3Server, run_env
from faultproxy import LEAK, FaultProxy
from spotckpt._events import redact

KEY = "AKIASPOTCKPTLEAKTEST"
SECRET = "spotckpt/Leak+Secret0123456789abcdefWXYZ"
TOKEN = "FwoGZXIvYXdzSPOTCKPTLEAKTOKEN0123456789/abc+def=="


@pytest.fixture
def creds(s3_env: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN}


def presigned(s3: S3Server, bucket: str) -> str:
    import boto3

    c = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                     aws_session_token=TOKEN, region_name="us-east-1")
    return c.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "run/x"}, ExpiresIn=60)


def leaks(text: str, url: str) -> list[str]:
    sig = re.search(r"Signature=([^&]+)", url).group(1)
    found = [name for name, s in (("secret key", SECRET), ("session token", TOKEN), ("presigned signature", sig),
                                  ("url-encoded token", TOKEN.replace("/", "%2F").replace("+", "%2B")))
             if s in text]
    if re.search(r"Signature=(?!<redacted>)", text):
        found.append("request signature")
    return found


def test_nothing_secret_in_errors_logs_events_and_files(tmp_path: Path, s3_server: S3Server, creds: dict,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, spotckpt's included
    bucket = s3_server.new_bucket()
    remote = f"s3://{bucket}/run/"
    url = presigned(s3_server, bucket)
    texts: list[str] = []
    with FaultProxy(s3_server.endpoint, rate=0.0, kinds=(LEAK,), leak_text=url) as proxy:
        opts = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
        # 1. at start: the server refuses with a message echoing the credentials
        proxy.set(rate=1.0)
        with pytest.raises(spotckpt.RemoteError) as ei:
            with spotckpt.Checkpointer({"n": 0}, local_dir=tmp_path / "a", remote=remote, storage_options=opts):
                pass
        texts.append(str(ei.value))
        assert "AccessDenied" in str(ei.value) or "Access Denied" in str(ei.value), str(ei.value)
        # 2. during training: uploads fail the same way (upload_failed events, warnings)
        proxy.set(rate=0.0)
        state = {"n": 0}
        with spotckpt.Checkpointer(state, local_dir=tmp_path / "b", remote=remote, storage_options=opts,
                                   every_steps=2) as ckpt:
            proxy.set(rate=1.0)
            for _ in ckpt.steps(4):
                state["n"] += 1
            assert not ckpt.flush(20)
            texts.append(str(ckpt.last_error))
            proxy.set(rate=0.0)
        assert proxy.faults[LEAK] >= 2
        # 3. a training subprocess whose remote fails: its stdout/stderr
        with FaultProxy(s3_server.endpoint, rate=1.0, kinds=(LEAK,), leak_text=url) as proxy2:
            env = run_env(SPOTCKPT_LOCAL_DIR=str(tmp_path / "c"), SPOTCKPT_REMOTE=remote,
                          AWS_ENDPOINT_URL_S3=proxy2.endpoint, **creds)
            r = subprocess.run([sys.executable, str(REPO / "tests/scripts/chaos_train.py"), "--total", "3"],
                               env=env, capture_output=True, text=True, timeout=120)
            assert r.returncode != 0 and "Access Denied" in r.stderr, r.stderr[-2000:]
            texts += [r.stdout, r.stderr]
    texts += [rec.getMessage() for rec in caplog.records if rec.name.startswith("spotckpt")]
    for p in tmp_path.rglob("*"):
        if p.is_file():
            texts.append(p.read_bytes().decode("utf-8", "replace"))
    assert any("upload_failed" in t for t in texts)
    for t in texts:
        assert not leaks(t, url), (leaks(t, url), t[:3000])


@pytest.mark.parametrize("text", [
    "GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={KEY}%2F20260101%2Fus-east-1"
    "%2Fs3%2Faws4_request&X-Amz-Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    "&X-Amz-Security-Token={TOKEN}",
    "https://b.s3.amazonaws.com/k?AWSAccessKeyId={KEY}&Signature=abcDEF%2B123%3D&Expires=1700000000",
    "Authorization: AWS4-HMAC-SHA256 Credential={KEY}/20260101/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "aws_secret_access_key = {SECRET}",
    "remote https://user:{SECRET}@minio.internal:9000/bucket/ failed",
    "token {TOKEN} expired",
])
def test_redact(text: str, creds: dict) -> None:
    text = text.format(KEY=KEY, SECRET=SECRET, TOKEN=TOKEN)
    out = redact(text)
    assert SECRET not in out and TOKEN not in out, out
    assert not re.search(r"Signature=(?!<redacted>)", out), out
    assert "<redacted>" in out
