"""A Transformers ``Trainer`` script as people write it (knows nothing about spotckpt).

A tiny GPT-2 built from a config (nothing is downloaded), a random-token dataset with a fixed
seed, ``checkpoint-N/`` every ``--save-steps`` into ``--output-dir`` with ``save_total_limit=2``,
and the usual resume idiom: ``resume_from_checkpoint=True`` if a ``checkpoint-*`` dir exists.
The final weights go to ``--out``, outside the watched dir.

Prints ``resume from checkpoint-N`` (or ``fresh start``), ``first step N`` (the global step
the loop starts from), ``saved checkpoint-N`` and ``finished step N``.
"""
from __future__ import annotations

import argparse
import glob
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Report(TrainerCallback):
    def __init__(self, step_sleep: float) -> None:
        self.step_sleep, self.first = step_sleep, True

    def on_step_begin(self, args, state, control, **kw):
        if self.first:
            print(f"first step {state.global_step}", flush=True)
            self.first = False

    def on_step_end(self, args, state, control, **kw):
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def on_save(self, args, state, control, **kw):
        print(f"saved checkpoint-{state.global_step}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--out", required=True, help="final state_dict, outside the watched dir")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (test pacing)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    targs = TrainingArguments(output_dir=args.output_dir, save_steps=args.save_steps, save_total_limit=2,
                              max_steps=args.max_steps, report_to=[], use_cpu=True, seed=0, logging_steps=10,
                              dataloader_num_workers=0, per_device_train_batch_size=4)
    # the model is built after TrainingArguments so that Trainer's seed applies to the init too
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    trainer = Trainer(model=model, args=targs, train_dataset=RandomTokens(96, 32, config.vocab_size),
                      callbacks=[Report(args.step_sleep)])
    resume = bool(glob.glob(os.path.join(args.output_dir, "checkpoint-*")))
    if resume:
        print(f"resume from {os.path.basename(get_last_checkpoint(args.output_dir))}", flush=True)
    else:
        print("fresh start", flush=True)
    trainer.train(resume_from_checkpoint=True if resume else None)
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, args.out)
    print(f"finished step {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
