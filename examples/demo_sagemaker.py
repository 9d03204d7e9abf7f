"""`make demo-sagemaker`: a script written for SageMaker runs unchanged under `spotckpt spot`.

1. Starts an S3 server (moto) on a free 127.0.0.1 port, makes a bucket and uploads the
   training data (the "training" channel).
2. Runs examples/sagemaker_style_contract.py, a script that reads only SM_* variables and
   /opt/ml paths (checkpoints hard-coded at /opt/ml/checkpoints), under `spotckpt spot` with
   the SageMaker container contract: the channel downloaded before each start (Downloading),
   hyperparameters as --KEY VALUE and SM_HPS, a private /opt/ml per instance, two spot
   interruptions, and /opt/ml/model uploaded as model.tar.gz at the end (Uploading).
3. Prints the status transitions and the report's ModelArtifacts, and checks the model in
   model.tar.gz against the uninterrupted result.

Takes about 40 s. Needs the test extras (moto[server], boto3): `make demo-sagemaker` installs them.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile

from demo import REPO, banner, s3_server

WORK = REPO / "demo-work" / "sagemaker"
SCRIPT = REPO / "examples" / "sagemaker_style_contract.py"
EPOCHS, SCALE = 60, 2


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    with s3_server(WORK) as (endpoint, env):
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="demo",
                          aws_secret_access_key="demo-secret-key", region_name="us-east-1")
        s3.create_bucket(Bucket="demo")
        data = " ".join(str(i) for i in range(1, 101)) + "\n"
        s3.put_object(Bucket="demo", Key="data/train/data.csv", Body=data.encode())
        banner(f"S3 server on {endpoint}: s3://demo/data/train/data.csv is the 'training' channel")

        banner("spotckpt spot with the SageMaker contract, interrupted at 3 s and 7 s of training")
        cmd = [sys.executable, "-m", "spotckpt", "spot", "--job-name", "sagemaker-demo",
               "--workdir", str(WORK / "job"), "--remote", "s3://demo/sagemaker-demo/checkpoints/",
               "--channel", "training=s3://demo/data/train/", "--output-path", "s3://demo/output/",
               "--hyperparameter", f"epochs={EPOCHS}", "--hyperparameter", f"scale={SCALE}",
               "--hyperparameter", "sleep=0.15",
               "--max-run", "300", "--interrupt-at", "3,7", "--capacity-wait", "1,2", "--grace", "10",
               "--", sys.executable, str(SCRIPT)]
        rc = subprocess.run(cmd, env=env).returncode

        report = json.loads((WORK / "job" / "describe-training-job.json").read_text())
        banner("job report (DescribeTrainingJob)")
        keys = ["TrainingJobName", "TrainingJobStatus", "SecondaryStatus", "HyperParameters",
                "InputDataConfig", "OutputDataConfig", "ModelArtifacts", "CheckpointConfig",
                "TrainingTimeInSeconds", "BillableTimeInSeconds", "InterruptionCount", "WorkLostSeconds"]
        print(json.dumps({k: report.get(k) for k in keys}, indent=1))
        print("SecondaryStatusTransitions:")
        for t in report["SecondaryStatusTransitions"]:
            print(f"  {t['Status']:<20} {t['StartTime']}  {t['StatusMessage']}")

        url = (report.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if not url:
            banner("no model artifact")
            return rc or 1
        key = url.split("/", 3)[3]
        with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket="demo", Key=key)["Body"].read())) as tar:
            model = json.load(tar.extractfile("model.json"))
        want = SCALE * sum(range(1, 101)) * EPOCHS * (EPOCHS + 1) / 2
        banner(f"{url}: model.json {model}; uninterrupted result {want:g}: "
               f"{'identical' if model['total'] == want else 'DIFFERENT'}")
        return rc if model["total"] == want else 1


if __name__ == "__main__":
    sys.exit(main())
