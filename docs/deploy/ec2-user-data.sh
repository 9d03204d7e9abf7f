#!/bin/bash
# EC2 user data for a spot training instance (see ec2.md): install spotckpt from a wheel you
# built (`python -m build --wheel`, uploaded to S3; spotckpt is not on a package index), the
# training code, and the systemd unit; start it. On a replacement instance the same user
# data runs again and `spotckpt run` pulls the newest checkpoint before training starts.
# The instance profile needs s3:GetObject/PutObject/ListBucket/DeleteObject on the bucket.
set -euo pipefail
BUCKET=my-bucket
WHEEL=spotckpt-0.1.0-py3-none-any.whl

dnf install -y python3.11 python3.11-pip awscli || apt-get install -y python3-venv awscli
id train >/dev/null 2>&1 || useradd --system --create-home train
mkdir -p /opt/train
aws s3 cp "s3://$BUCKET/code/train.tar.gz" /tmp/train.tar.gz
tar -xzf /tmp/train.tar.gz -C /opt/train
aws s3 cp "s3://$BUCKET/wheels/$WHEEL" "/tmp/$WHEEL"
python3.11 -m venv /opt/train/.venv || python3 -m venv /opt/train/.venv
# The CUDA build of torch on a GPU instance (the default index on Linux); pin its version.
/opt/train/.venv/bin/pip install "torch==2.13.0" "/tmp/$WHEEL"
chown -R train: /opt/train
aws s3 cp "s3://$BUCKET/code/spotckpt-train.service" /etc/systemd/system/spotckpt-train.service
systemctl daemon-reload
systemctl enable --now spotckpt-train.service
