"""A custom loop over a shuffled DataLoader, the way most people write it, for the
data-position tests: a model with dropout, the iterator kept across steps.

    python data_position_train.py --loader plain|stateful --workers 0|2 --out W.pt \
        [--wait-at STEP] [--old]

Prints "step N" before each step. ``--wait-at N``: after printing "step N", wait for a line
on stdin (the test sends SIGTERM meanwhile: a deterministic interruption step, no sleeps).
``--old``: the iterator the user keeps himself (``iter(loader)``, again at each epoch's end):
what the README showed before ``Checkpointer.batches``.
"""
import argparse
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spotckpt

ap = argparse.ArgumentParser()
ap.add_argument("--loader", choices=["plain", "stateful"], default="plain")
ap.add_argument("--workers", type=int, default=0)
ap.add_argument("--persistent", action="store_true")
ap.add_argument("--generator", action="store_true", help="DataLoader(generator=...)")
ap.add_argument("--steps", type=int, default=36)
ap.add_argument("--wait-at", type=int, default=-1)
ap.add_argument("--old", action="store_true")
ap.add_argument("--loader-not-in-state", action="store_true", help="batches() saves the loader's state")
ap.add_argument("--out", required=True)
args = ap.parse_args()

torch.manual_seed(0)
torch.set_num_threads(1)
g = torch.Generator().manual_seed(1)
x = torch.randn(96, 8, generator=g)
data = TensorDataset(x, x.sum(1, keepdim=True).tanh())
kw = dict(batch_size=8, shuffle=True, num_workers=args.workers,
          persistent_workers=args.persistent,
          generator=torch.Generator().manual_seed(5) if args.generator else None)  # 12 batches an epoch
if args.loader == "stateful":
    from torchdata.stateful_dataloader import StatefulDataLoader
    loader = StatefulDataLoader(data, **kw)
else:
    loader = DataLoader(data, **kw)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
state = {"model": model, "opt": opt}
if args.loader == "stateful" and not args.loader_not_in_state:
    state["loader"] = loader

with spotckpt.Checkpointer(state, every_steps=5) as ckpt:
    print(f"resumed at step {ckpt.restored_step}" if ckpt.restored_step is not None
          else "fresh start at step 0", flush=True)
    if args.old:
        it = iter(loader)
    else:
        batches = ckpt.batches(loader)
    for step in ckpt.steps(total=args.steps):
        print(f"step {step}", flush=True)
        if step == args.wait_at:
            sys.stdin.readline()
        if args.old:
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(loader)
                xb, yb = next(it)
        else:
            xb, yb = next(batches)
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
torch.save(model.state_dict(), args.out)
print("finished", flush=True)
