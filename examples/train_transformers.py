"""Hugging Face Transformers ``Trainer`` that survives spot interruptions with one callback.

A tiny GPT-2 built from a config (nothing is downloaded) on random tokens; swap in your
model, dataset and ``TrainingArguments``. The two spotckpt lines are marked.

    HF_HUB_OFFLINE=1 SPOTCKPT_REMOTE=s3://bucket/run1/ python examples/train_transformers.py

SIGTERM it (or let the platform do so): Trainer writes its checkpoint at the end of the
current optimizer step, it is made durable on the remote and the process exits 143. Run the
same command again, on a new machine with an empty local dir: training continues from that
step, and the final weights are those of an uninterrupted run.
"""
from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from spotckpt.integrations.transformers import SpotCheckpoint


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 128, length: int = 32, vocab: int = 100) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", default="/tmp/trainer-output",
                    help="Trainer's own dir: outside spotckpt's local dir (SPOTCKPT_LOCAL_DIR)")
    ap.add_argument("--local-dir", default=None, help="spotckpt's local dir (default /opt/ml/checkpoints)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--every", type=int, default=20, help="save every N optimizer steps")
    args = ap.parse_args()

    targs = TrainingArguments(output_dir=args.output_dir, num_train_epochs=args.epochs, use_cpu=True,
                              per_device_train_batch_size=8, save_strategy="no", save_total_limit=2,
                              report_to=[], logging_steps=20, seed=0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32))
    spot = SpotCheckpoint(every_n_steps=args.every, local_dir=args.local_dir)   # spotckpt (1/2)
    trainer = Trainer(model=model, args=targs, train_dataset=RandomTokens(), callbacks=[spot])
    trainer.train(resume_from_checkpoint=spot.resume_path())                  # spotckpt (2/2)
    print(f"finished at step {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
