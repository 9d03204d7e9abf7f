"""A Lightning Trainer that survives spot interruptions with one callback.

A small MLP (built in ``configure_model``, with dropout, so the RNG matters), Adam and a
step LR scheduler, on synthetic data with a validation set. The train loader is a plain
shuffled ``DataLoader``: the callback records the RNG each epoch's order is drawn from, so a
checkpoint taken mid-epoch resumes at the next batch of the same order (the consumed ones are
skipped, not loaded) and the final weights are bitwise those of an uninterrupted run.

    SPOTCKPT_REMOTE=s3://bucket/run1/ python examples/train_lightning.py --max-epochs 4

Nothing else is needed to resume: run the same command again (on a new machine, with an
empty local dir) and ``trainer.fit`` continues from the newest checkpoint.
"""
from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spotckpt.integrations.lightning import SpotCheckpoint


def make_data(n: int = 1280, dim: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g))


class Regressor(L.LightningModule):
    def __init__(self, sleep: float = 0.0) -> None:
        super().__init__()
        self.net: nn.Module | None = None
        self.sleep = sleep

    def configure_model(self) -> None:
        # Lightning's hook for building layers at fit time; their random initialisation draws
        # from the global RNG after the checkpoint is restored, which the callback accounts for.
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step % 20 == 0:
            print(f"step {self.global_step} loss {loss.item():.5f}", flush=True)
        if self.sleep:
            time.sleep(self.sleep)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        step = self.trainer.global_step
        print(f"resumed at step {step}" if step else "fresh start at step 0", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-epochs", type=int, default=4)
    ap.add_argument("--every-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to make runs interruptible")
    ap.add_argument("--out", default=None, help="write the final state_dict here")
    args = ap.parse_args()

    torch.set_num_threads(1)  # bitwise reproducibility across runs
    L.seed_everything(0, verbose=False)
    model = Regressor(args.sleep)
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", devices=1, deterministic=True,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SpotCheckpoint(every_n_steps=args.every_steps)])
    data = make_data()
    train, val = TensorDataset(*data[:1024]), TensorDataset(*data[1024:])
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    trainer.fit(model, loader, DataLoader(val, batch_size=64))
    print(f"finished at step {trainer.global_step}", flush=True)
    if args.out:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
