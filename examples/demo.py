"""`make demo`: a training job survives two spot interruptions, against a real S3 server.

1. Starts an S3 server (moto) in a subprocess on a free 127.0.0.1 port and makes a bucket.
2. Trains examples/train_custom_loop.py once without interruptions, for reference.
3. Runs the same script under `spotckpt spot`: the managed-spot lifecycle emulated locally,
   interrupted twice (SIGTERM, then SIGKILL after the grace), each restart on an empty
   local dir resuming from S3. Statuses are printed as SageMaker reports them.
4. Ends with the job report (DescribeTrainingJob-like JSON) and checks that the final
   weights are bitwise identical to the uninterrupted run's.

Takes about a minute. Needs the test extras (moto[server], boto3): `make demo` installs them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "demo-work"
SCRIPT = REPO / "examples" / "train_custom_loop.py"
TRAIN_ARGS = ["--steps", "600", "--every-steps", "50"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(work: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """An S3 server (moto, logging to ``work``/moto.log) for the length of the block: yields
    its endpoint and this environment pointed at it (credentials, no SPOTCKPT_* settings)."""
    port = free_port()
    log = open(work / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        else:
            proc.kill()
        if proc.poll() is not None:
            sys.exit(f"demo: the S3 test server did not start (see {work / 'moto.log'})")
        env = dict(os.environ, AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="demo",
                   AWS_SECRET_ACCESS_KEY="demo-secret-key", AWS_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", PYTHONUNBUFFERED="1")
        for k in [k for k in env if k.startswith("SPOTCKPT_")]:
            del env[k]
        yield endpoint, env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    with s3_server(WORK) as (endpoint, env):
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="demo",
                     aws_secret_access_key="demo-secret-key", region_name="us-east-1").create_bucket(Bucket="demo")
        banner(f"S3 server on {endpoint}, bucket s3://demo/")

        banner("reference: the same training, uninterrupted (local only)")
        ref = subprocess.run([sys.executable, str(SCRIPT), *TRAIN_ARGS, "--out", str(WORK / "reference.pt")],
                             env=dict(env, SPOTCKPT_LOCAL_DIR=str(WORK / "reference-ckpt")),
                             stdout=subprocess.DEVNULL)
        if ref.returncode != 0:
            return ref.returncode

        banner("spotckpt spot: managed spot training, interrupted at 8 s and 18 s of training")
        cmd = [sys.executable, "-m", "spotckpt", "spot",
               "--job-name", "spotckpt-demo", "--workdir", str(WORK / "job"),
               "--remote", "s3://demo/spotckpt-demo/checkpoints/",
               "--max-run", "300", "--max-wait", "600", "--interrupt-at", "8,18",
               "--capacity-wait", "1,3,2", "--grace", "10", "--spot-discount", "0.7",
               "--", sys.executable, str(SCRIPT), *TRAIN_ARGS, "--sleep", "0.04",
               "--out", str(WORK / "final.pt")]
        rc = subprocess.run(cmd, env=env).returncode

        report = json.loads((WORK / "job" / "describe-training-job.json").read_text())
        banner("job report (DescribeTrainingJob)")
        keys = ["TrainingJobName", "TrainingJobStatus", "SecondaryStatus", "TrainingTimeInSeconds",
                "BillableTimeInSeconds", "ManagedSpotTrainingSavingsPercent", "InterruptionCount",
                "Interruptions", "WorkLostSeconds"]
        print(json.dumps({k: report[k] for k in keys}, indent=1))
        print("SecondaryStatusTransitions:")
        for t in report["SecondaryStatusTransitions"]:
            print(f"  {t['Status']:<20} {t['StartTime']}  {t['StatusMessage']}")
        print(f"full report: {WORK / 'job' / 'describe-training-job.json'}")

        import torch

        a = torch.load(WORK / "final.pt", weights_only=True)
        b = torch.load(WORK / "reference.pt", weights_only=True)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        banner(f"final weights bitwise identical to the uninterrupted run: {same}")
        return rc if same else 1


if __name__ == "__main__":
    sys.exit(main())
