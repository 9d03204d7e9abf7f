"""Cloud metadata notices reach a real training subprocess, which commits a durable
checkpoint before the deadline; an EC2 rebalance recommendation adds a checkpoint only."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, run_env
from metadata_servers import MetadataServer
from spotckpt._commit._local import LocalDir
from spotckpt._notices._metadata import AzureSource, EC2Source, GCPSource, sources_from_env
from spotckpt._remote._store import RemoteStore

SCRIPT = str(EXAMPLES / "train_custom_loop.py")


def start(local: Path, remote: str, steps: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, "--steps", str(steps), "--every-steps", "100", "--sleep", "0.01"],
        env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=remote,
                    SPOTCKPT_METADATA_INTERVAL="0.2", **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_training(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        if line.startswith(("fresh start", "resumed")):
            return
    raise AssertionError("ended before training")


def events(local: Path) -> list[dict]:
    p = LocalDir(local).meta / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()]


@pytest.mark.parametrize("cloud", ["ec2", "gcp", "azure"])
def test_notice_from_metadata_makes_durable_checkpoint(tmp_path: Path, s3_remote: str, cloud: str) -> None:
    local = tmp_path / "ck"
    with MetadataServer() as md:
        env = {"ec2": {"AWS_EC2_METADATA_SERVICE_ENDPOINT": md.url, "AWS_EC2_METADATA_DISABLED": "false"},
               "gcp": {"GCE_METADATA_HOST": md.url.removeprefix("http://")},
               "azure": {"SPOTCKPT_AZURE_METADATA_ENDPOINT": md.url}}[cloud]
        proc = start(local, s3_remote, 5000, **env)
        wait_training(proc)
        time.sleep(0.5)
        armed = time.time()
        if cloud == "ec2":
            md.spot_at = armed + 20  # EC2 gives two minutes; the time of the stop is in the notice
        elif cloud == "gcp":
            md.gcp_preempted = True
        else:
            md.azure_not_before = armed + 20
        out, _ = proc.communicate(timeout=60)
        done = time.time()
    assert proc.returncode == 143, out
    ev = events(local)
    notice = next(e for e in ev if e["event"] == "notice")
    assert notice["source"].startswith({"ec2": "ec2-spot", "gcp": "gcp-preempted", "azure": "azure-preempt"}[cloud])
    flush = next(e for e in ev if e["event"] == "flush")
    assert flush["durable"] is True and flush["seconds_left"] > 0
    step = flush["durable_step"]
    assert RemoteStore(s3_remote).committed()[-1] == step == flush["step"] > 0
    limit = 30 if cloud == "gcp" else 20
    assert done - armed < limit  # durable (and exited) before the deadline
    if cloud == "ec2":
        assert md.unauthorized == 0 and ("PUT", "/latest/api/token") in md.requests


@pytest.mark.slow
def test_rebalance_recommendation_checkpoints_and_training_goes_on(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ck"
    with MetadataServer() as md:
        proc = start(local, s3_remote, 400, AWS_EC2_METADATA_SERVICE_ENDPOINT=md.url,
                     AWS_EC2_METADATA_DISABLED="false")
        wait_training(proc)
        time.sleep(0.6)
        md.rebalance = True
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    ev = events(local)
    adv = [e for e in ev if e["event"] == "advisory"]
    assert len(adv) == 1 and adv[0]["source"] == "ec2-rebalance"
    saved = [e["step"] for e in ev if e["event"] == "saved"]
    assert adv[0]["step"] in saved and adv[0]["step"] % 100 != 0  # an extra, early checkpoint
    assert saved[-1] == 400 and not any(e["event"] == "notice" for e in ev)


def test_sources_only_where_they_apply() -> None:
    no_dmi = lambda name: ""  # noqa: E731
    assert sources_from_env({}, dmi=no_dmi) == []  # here: no cloud, no network traffic at all
    ec2 = sources_from_env({}, dmi=lambda n: {"sys_vendor": "Amazon EC2"}.get(n, ""))
    assert [type(s) for s in ec2] == [EC2Source]
    gcp = sources_from_env({}, dmi=lambda n: {"product_name": "Google Compute Engine"}.get(n, ""))
    assert [type(s) for s in gcp] == [GCPSource]
    az = sources_from_env({}, dmi=lambda n: {"sys_vendor": "Microsoft Corporation",
                                             "chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"}.get(n, ""))
    assert [type(s) for s in az] == [AzureSource]
    assert sources_from_env({"SPOTCKPT_METADATA": "off", "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://x"},
                            dmi=no_dmi) == []
    assert sources_from_env({"AWS_EC2_METADATA_DISABLED": "true"},
                            dmi=lambda n: {"sys_vendor": "Amazon EC2"}.get(n, "")) == []


def test_absent_endpoint_costs_nothing(tmp_path: Path) -> None:
    """A configured endpoint that does not answer is dropped after one try; training is
    never blocked by it."""
    import spotckpt
    from conftest import free_port

    port = free_port()
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{port}", "SPOTCKPT_METADATA_INTERVAL": "0.05"}
    import os
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        t0 = time.monotonic()
        with spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path, remote=None) as ckpt:
            for _ in ckpt.steps(50):
                time.sleep(0.002)
            time.sleep(0.3)
            assert ckpt._watcher.active == [] and not ckpt._watcher._thread.is_alive()
        assert time.monotonic() - t0 < 5
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
