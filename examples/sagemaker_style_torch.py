"""An unmodified SageMaker spot-training script: ``torch.save`` of ``checkpoint.pth`` every epoch.

It knows nothing about spotckpt, as in the SageMaker examples: at the end of each epoch it
saves ``{epoch, model, optimizer}`` to ``<checkpoint-dir>/checkpoint.pth`` and at start it
loads that file if present. Under ``spotckpt run`` the file is mirrored to the remote once
it is written and closed, and pulled back into an empty dir on restart:

    spotckpt run --remote s3://bucket/job/ -- python examples/sagemaker_style_torch.py \\
        --checkpoint-dir /opt/ml/checkpoints --epochs 10

Each epoch's batch order comes from a generator seeded by the epoch number, so a resumed
run ends with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint-dir", default="/opt/ml/checkpoints")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch, to make runs interruptible")
    ap.add_argument("--out", default=None, help="write the final state_dict here")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    path = os.path.join(args.checkpoint_dir, "checkpoint.pth")
    start = 0
    if os.path.isfile(path):
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"] + 1
        print(f"resumed from checkpoint.pth at epoch {start}", flush=True)
    else:
        print("no checkpoint: starting at epoch 0", flush=True)

    for epoch in range(start, args.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if args.sleep:
            time.sleep(args.sleep)
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        print(f"epoch {epoch} loss {loss.item():.5f} saved", flush=True)
    if args.out:
        torch.save(model.state_dict(), args.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
