"""A script written against SageMaker's training-container contract and nothing else.

It reads only what a SageMaker training container gives it, as AWS's own managed-spot
examples do: ``SM_HOSTS``, ``SM_CURRENT_HOST``, ``SM_NUM_GPUS``, ``SM_NUM_CPUS``,
``SM_TRAINING_ENV``, ``SM_HPS``, ``SM_MODEL_DIR``, ``SM_CHANNEL_TRAINING``,
``SM_OUTPUT_DATA_DIR``, hyperparameters as ``--KEY VALUE`` arguments, and the hard-coded
checkpoint dir ``/opt/ml/checkpoints`` (``checkpoint.json`` written every epoch, loaded at
start if present). No spotckpt import. Under ``spotckpt spot`` it runs unchanged:

    spotckpt spot --channel training=s3://bucket/data/ --hyperparameter epochs=20 \\
        --output-path s3://bucket/output/ --remote s3://bucket/checkpoints/ \\
        --interrupt-at 2,5 -- python examples/sagemaker_style_contract.py

The "training" is exact arithmetic on the channel's numbers (``total += scale * (epoch + 1)
* sum(data)``), so the final model tells whether an epoch was skipped or done twice:
``scale * sum(data) * epochs * (epochs + 1) / 2``. Without the contract (no ``SM_*``
variables) it stops at once with a KeyError, as it would outside SageMaker.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    hosts = json.loads(os.environ["SM_HOSTS"])
    current = os.environ["SM_CURRENT_HOST"]
    num_gpus, num_cpus = int(os.environ["SM_NUM_GPUS"]), int(os.environ["SM_NUM_CPUS"])
    training_env = json.loads(os.environ["SM_TRAINING_ENV"])
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch")
    ap.add_argument("--model-dir", default=os.environ["SM_MODEL_DIR"])
    ap.add_argument("--train", default=os.environ["SM_CHANNEL_TRAINING"])
    ap.add_argument("--checkpoint-path", default="/opt/ml/checkpoints")  # hard-coded, as in AWS's examples
    args = ap.parse_args()
    assert current in hosts and num_cpus >= 1 and num_gpus >= 0, (current, hosts, num_cpus, num_gpus)
    assert training_env["hyperparameters"] == json.loads(os.environ["SM_HPS"])
    print(f"host {current} of {hosts}, {num_cpus} CPU(s), {num_gpus} GPU(s), "
          f"hyperparameters {os.environ['SM_HPS']}", flush=True)

    # A new instance's checkpoint dir holds what the platform restored, nothing else: not
    # another job's files, not the host's.
    os.makedirs(args.checkpoint_path, exist_ok=True)
    found = sorted(os.listdir(args.checkpoint_path))
    if set(found) - {"checkpoint.json"}:
        print(f"foreign files in {args.checkpoint_path}: {found}", flush=True)
        return 3

    with open(os.path.join(args.train, "data.csv")) as f:
        data = [float(x) for x in f.read().split()]
    ckpt = os.path.join(args.checkpoint_path, "checkpoint.json")
    start, total = 0, 0.0
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            state = json.load(f)
        start, total = state["epoch"] + 1, state["total"]
        print(f"resumed from checkpoint at epoch {start}", flush=True)
    else:
        print("no checkpoint: starting at epoch 0", flush=True)

    for epoch in range(start, args.epochs):
        total += args.scale * (epoch + 1) * sum(data)
        time.sleep(args.sleep)
        with open(ckpt, "w") as f:
            json.dump({"epoch": epoch, "total": total}, f)
        print(f"epoch {epoch} total {total:g}", flush=True)

    with open(os.path.join(args.model_dir, "model.json"), "w") as f:
        json.dump({"total": total, "epochs": args.epochs}, f)
    with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "metrics.json"), "w") as f:
        json.dump({"final_total": total}, f)
    print(f"done: total {total:g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
