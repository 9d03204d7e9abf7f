"""Data-parallel training with torch.distributed (gloo, CPU) that survives spot interruptions.

    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 200 --out final.pt

Every rank runs the same ``with spotckpt.Checkpointer(...)`` block. A SIGTERM to any one rank
stops all ranks at the same step boundary; each rank saves its own part (its RNG state
differs), the checkpoint is committed only when every part is durable, and a restart with
the same world size resumes every rank from the same step. Set SPOTCKPT_REMOTE for S3.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import spotckpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every-steps", type=int, default=20)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank
    g = torch.Generator().manual_seed(1234)
    x_all, w_true = torch.randn(4096, 16, generator=g), torch.randn(16, 1, generator=g)
    y_all = torch.tanh(x_all @ w_true)
    model = DDP(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(100 + rank)  # per-rank dropout masks: per-rank RNG state to restore
    batch, per_rank = 64, 64 // world
    steps_per_epoch = len(x_all) // batch

    with spotckpt.Checkpointer({"model": model, "optim": opt}, every_steps=args.every_steps) as ckpt:
        print(f"rank {rank} pid {os.getpid()} " +
              (f"resumed at step {ckpt.restored_step}" if ckpt.restored_step is not None else "fresh start"),
              flush=True)
        perm, epoch = None, None
        for step in ckpt.steps(total=args.steps):
            e, i = divmod(step, steps_per_epoch)
            if e != epoch:  # the epoch's order depends only on the epoch number
                epoch, perm = e, torch.randperm(len(x_all), generator=torch.Generator().manual_seed(e))
            idx = perm[i * batch + rank * per_rank: i * batch + (rank + 1) * per_rank]
            loss = nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if args.sleep:
                time.sleep(args.sleep)
    if rank == 0:
        print(f"finished {args.steps} steps", flush=True)
        if args.out:
            torch.save(model.module.state_dict(), args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
