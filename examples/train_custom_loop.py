"""A custom PyTorch loop that survives spot interruptions with one `with` block.

A small MLP (with dropout, so RNG state matters) on synthetic data, a plain shuffled
DataLoader, Adam and a step LR scheduler. ``ckpt.batches(loader)`` owns the iterator across
epochs: a resumed run redraws the interrupted epoch's order, skips the batches already
trained on (without loading them) and leaves the RNG as the checkpoint had it, so it sees
exactly the batches and dropout masks an uninterrupted run would.

    SPOTCKPT_REMOTE=s3://bucket/run1/ python examples/train_custom_loop.py --steps 300

Writes the final weights to --out (default: <local_dir>/final.pt is not used; pass --out).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spotckpt


def make_data(n: int = 2048, dim: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to make runs interruptible")
    ap.add_argument("--out", default=None, help="write the final state_dict here")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)  # bitwise reproducibility across runs
    data = make_data()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers)

    state = {"model": model, "optim": opt, "sched": sched}
    with spotckpt.Checkpointer(state, every_steps=args.every_steps) as ckpt:
        print(f"resumed at step {ckpt.restored_step}" if ckpt.restored_step is not None
              else "fresh start at step 0", flush=True)
        batches = ckpt.batches(loader)  # epoch after epoch; resumes where the checkpoint was
        for step in ckpt.steps(total=args.steps):
            x, y = next(batches)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                print(f"step {step} loss {loss.item():.5f}", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
    print(f"finished {args.steps} steps", flush=True)
    if args.out:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
