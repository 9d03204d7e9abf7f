"""A custom loop that first dumps --files small files into its checkpoint dir (as scripts dump
logs or samples), then trains, saving every --every-steps steps. It prints ``wrote N files``
once they are all closed, and at the end the step it saved at an interruption notice."""
import argparse
import time

import torch

import spotckpt

ap = argparse.ArgumentParser()
ap.add_argument("--files", type=int, default=10_000)
ap.add_argument("--steps", type=int, default=100_000)
ap.add_argument("--every-steps", type=int, default=5)
ap.add_argument("--sleep", type=float, default=0.01)
args = ap.parse_args()
torch.manual_seed(0)
state = {"w": torch.rand(4096), "n": 0}
with spotckpt.Checkpointer(state, every_steps=args.every_steps) as ck:
    for i in range(args.files):
        d = ck.local_dir / "samples" / f"{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"sample-{i % 100:02d}.txt").write_text(f"sample {i}\n" * 4)
    print(f"wrote {args.files} files", flush=True)
    for step in ck.steps(args.steps):
        state["w"].add_(1e-3)
        state["n"] += 1
        time.sleep(args.sleep)
    if ck.interrupted:
        print(f"saved at the notice: step {ck.step}", flush=True)
