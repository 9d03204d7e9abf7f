"""Two ways unmodified scripts find their checkpoint on restart (no spotckpt in them).

``--mode listdir``: AWS's managed-spot TF2 ``mnist.py``, translated to torch. A non-empty
checkpoint dir means "resume": the newest epoch is the largest number in the file names
(``max()`` of an empty list raises, as in the original, if the dir holds anything else).
Saves ``model-epoch-NNN.pt`` after every epoch.

``--mode mtime``: a ring of three files ``slot-{epoch % 3}.pt``; on restart the newest file
*by mtime* is loaded (so pulled files must keep their mtimes).

Prints ``fresh start``, ``resumed from <file> at epoch N``, ``saved epoch N`` and ``done``.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint-dir", required=True)
    ap.add_argument("--mode", choices=["listdir", "mtime"], required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per epoch before its save")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    d = args.checkpoint_dir

    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    if not os.path.exists(d):
        os.makedirs(d)
    start, path = 0, None
    if args.mode == "listdir":
        if os.listdir(d):
            files = [f for f in os.listdir(d) if f.endswith(".pt")]
            epoch_numbers = [int(re.search(r"(\d+)\.pt$", f).group(1)) for f in files]
            start = max(epoch_numbers)
            path = os.path.join(d, f"model-epoch-{start:03d}.pt")
    else:
        files = glob.glob(os.path.join(d, "slot-*.pt"))
        if files:
            path = max(files, key=os.path.getmtime)
    if path is not None:
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"]
        print(f"resumed from {os.path.basename(path)} at epoch {start}", flush=True)
    else:
        print("fresh start", flush=True)

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
        n = epoch + 1
        name = f"model-epoch-{n:03d}.pt" if args.mode == "listdir" else f"slot-{n % 3}.pt"
        torch.save({"epoch": n, "model": model.state_dict(), "optimizer": opt.state_dict()}, os.path.join(d, name))
        print(f"saved epoch {n}", flush=True)
    if args.out:
        torch.save(model.state_dict(), args.out)
    print("done", flush=True)


if __name__ == "__main__":
    main()
