"""A Lightning script as people write it, with no spotckpt in it: ``ModelCheckpoint`` every
``--every`` steps into ``--ckpt-dir``, ``save_last="link"`` (``last.ckpt`` is a symlink to the
newest checkpoint file), and ``trainer.fit(..., ckpt_path="last")`` to resume.

The train loader is resumable (Lightning saves its ``state_dict`` in the checkpoint) and the
model has no dropout, so a resumed run ends with an uninterrupted run's weights.
Prints ``fresh start`` or ``resumed at step N``, ``finished at step N``.
"""
from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset


class Batches:
    """Batches in an order fixed by the epoch number, resumable mid-epoch."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __iter__(self):
        if self.pos >= len(self):
            self.epoch, self.pos = self.epoch + 1, 0
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(10_000 + self.epoch))
        while self.pos < len(self):
            idx = order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
            self.pos += 1
            yield self.data[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class Regressor(L.LightningModule):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        self.sleep = sleep

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.sleep:
            time.sleep(self.sleep)
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def on_train_start(self) -> None:
        step = self.trainer.global_step
        print(f"resumed at step {step}" if step else "fresh start", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--max-epochs", type=int, default=3)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step (test pacing)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1024, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 1, generator=g))
    ckpt = ModelCheckpoint(dirpath=args.ckpt_dir, save_last="link", every_n_train_steps=args.every)
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", devices=1, deterministic=True,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt])
    model = Regressor(args.sleep)
    trainer.fit(model, Batches(TensorDataset(x, y), 32), ckpt_path="last")
    print(f"finished at step {trainer.global_step}", flush=True)
    if args.out:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
