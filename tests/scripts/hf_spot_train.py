"""A Transformers ``Trainer`` with spotckpt's callback: tiny GPT-2 from a config (nothing is
downloaded), random tokens with a fixed seed, dropout on (so the RNG matters), 2 epochs.

Prints ``resume from step-N`` (or ``fresh start``), ``step N`` after each optimizer step and
``finished step N``; the final weights go to ``--out``. ``--wait-at K``: after step K, wait
(no step runs) until the interruption notice has arrived, so a test's SIGTERM lands at a
step it chose without depending on timing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from spotckpt.integrations.transformers import SpotCheckpoint  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Report(TrainerCallback):
    def __init__(self, spot: SpotCheckpoint, wait_at: int | None) -> None:
        self.spot, self.wait_at = spot, wait_at

    def on_train_begin(self, args, state, control, **kw):
        sys.stdout.flush()  # one write(2) per line: the ranks share the pipe
        os.write(1, f"rank {args.process_index} pid {os.getpid()}\n".encode())

    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            print(f"step {state.global_step}", flush=True)
        if state.global_step == self.wait_at:
            if state.is_world_process_zero:
                print(f"waiting at step {state.global_step}", flush=True)
            end = time.monotonic() + 300
            while not self.spot.checkpointer.should_stop and time.monotonic() < end:
                time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--local-dir", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--every", type=int, default=None, help="SpotCheckpoint(every_n_steps)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--wait-at", type=int, default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    targs = TrainingArguments(output_dir=args.output_dir, num_train_epochs=args.epochs, save_strategy="no",
                              report_to=[], use_cpu=True, seed=0, logging_steps=5, lr_scheduler_type="linear",
                              dataloader_num_workers=0, per_device_train_batch_size=4, disable_tqdm=True,
                              gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    spot = SpotCheckpoint(every_n_steps=args.every, local_dir=args.local_dir)
    trainer = Trainer(model=model, args=targs, train_dataset=RandomTokens(64, 16, config.vocab_size),
                      callbacks=[Report(spot, args.wait_at), spot])  # (Report waits before spot polls)
    resume = spot.resume_path()
    if trainer.args.process_index == 0:
        print(f"resume from {os.path.basename(resume)}" if resume else "fresh start", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.args.process_index == 0:
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, args.out)
        print(f"finished step {trainer.state.global_step}", flush=True)


if __name__ == "__main__":
    main()
