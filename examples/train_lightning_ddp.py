"""Lightning DDP on CPU (gloo) that survives spot interruptions with the same one callback.

    python examples/train_lightning_ddp.py --devices 2          # Lightning starts the second rank itself
    torchrun --nproc-per-node 2 examples/train_lightning_ddp.py --devices 2   # or torchrun starts both

Every rank saves its own part (model and optimizer copy, loops, its dataloader position, its
RNG: dropout masks differ per rank). A SIGTERM to any one rank stops every rank after the same
batch, each part is made durable, and the process exits with status 143. Run the same
command again, on new machines with empty local dirs and the same number of ranks, and every
rank resumes from the same step; the final weights are bitwise those of an uninterrupted run.
Set SPOTCKPT_REMOTE (s3://bucket/prefix/) and SPOTCKPT_LOCAL_DIR as for one process.
"""
from __future__ import annotations

import argparse
import os
import time

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spotckpt.integrations.lightning import SpotCheckpoint


def make_data(n: int = 1280, dim: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g))


class ShardedBatches:
    """Each global batch split across the ranks, in an order fixed by the epoch number, and
    resumable mid-epoch (Lightning saves ``state_dict()`` with every checkpoint, per rank).

    The rank is read when iteration starts, once Lightning has created the process group, so
    the same object can be passed to ``fit`` before the other ranks exist."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.epoch, self.pos = 0, 0  # pos: global batches of this epoch already handed out

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        share = self.batch_size // world
        if self.pos >= len(self):
            self.epoch, self.pos = self.epoch + 1, 0
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(10_000 + self.epoch))
        while self.pos < len(self):
            start = self.pos * self.batch_size + rank * share
            self.pos += 1
            yield self.data[order[start:start + share]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class Regressor(L.LightningModule):
    def __init__(self, sleep: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
        self.sleep = sleep

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.sleep:
            time.sleep(self.sleep)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        # Per-rank dropout masks. On a resumed run the callback puts each rank's saved RNG
        # state back after this, just before the first resumed batch.
        torch.manual_seed(100 + self.global_rank)

    def on_train_start(self) -> None:
        step = self.trainer.global_step
        # one write, so that the ranks' lines do not interleave on a shared stdout
        print(f"rank {self.global_rank} pid {os.getpid()} "
              + (f"resumed at step {step}" if step else "fresh start at step 0") + "\n", end="", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--max-epochs", type=int, default=3)
    ap.add_argument("--every-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch, split across the ranks")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to make runs interruptible")
    ap.add_argument("--out", default=None, help="rank 0 writes the final state_dict here")
    args = ap.parse_args()

    torch.set_num_threads(1)  # bitwise reproducibility across runs
    L.seed_everything(0, verbose=False)  # the same initial weights on every rank
    model = Regressor(args.sleep)
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", devices=args.devices, strategy="ddp",
                        deterministic=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[SpotCheckpoint(every_n_steps=args.every_steps)])
    data = make_data()
    train, val = TensorDataset(*data[:1024]), TensorDataset(*data[1024:])
    trainer.fit(model, ShardedBatches(train, args.batch_size), DataLoader(val, batch_size=64))
    if trainer.is_global_zero:
        print(f"finished at step {trainer.global_step}", flush=True)
        if args.out:
            torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
