"""Managed spot training on SageMaker with spotckpt inside the container (see sagemaker.md).

Needs the SageMaker Python SDK (`pip install sagemaker`, not a spotckpt dependency) and an
image built from docker/Dockerfile pushed to ECR. spotckpt does the checkpoint sync itself
(SPOTCKPT_REMOTE), so SageMaker's own checkpoint sync is left off: never both on one prefix.
"""
from sagemaker.estimator import Estimator

estimator = Estimator(
    image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/spotckpt-train:latest",
    role="arn:aws:iam::123456789012:role/SageMakerTrainingRole",
    instance_count=1,
    instance_type="ml.g5.xlarge",
    use_spot_instances=True,
    max_run=24 * 3600,           # MaxRuntimeInSeconds: seconds instances run, all starts together
    max_wait=48 * 3600,          # MaxWaitTimeInSeconds: wall clock incl. waits for capacity; > max_run
    # checkpoint_s3_uri / checkpoint_local_path are left unset: spotckpt syncs
    # /opt/ml/checkpoints itself (verified, planned to the 120 s deadline). To use
    # SageMaker's sync instead, set checkpoint_s3_uri and do NOT set SPOTCKPT_REMOTE.
    environment={
        "SPOTCKPT_REMOTE": "s3://my-bucket/spotckpt/train-resnet/",
        "SPOTCKPT_LOCAL_DIR": "/opt/ml/checkpoints",
        "SPOTCKPT_GRACE_SECONDS": "115",   # SageMaker: 120 s from SIGTERM to SIGKILL
    },
    output_path="s3://my-bucket/output/",   # /opt/ml/model -> <output_path>/<job>/output/model.tar.gz
    hyperparameters={"epochs": 90, "lr": 0.1},
)
estimator.fit({"training": "s3://my-bucket/data/train/"}, job_name="train-resnet-001")
