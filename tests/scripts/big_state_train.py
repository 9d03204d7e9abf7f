"""A training loop whose state is large (a random tensor of --mb MiB), for upload-timing tests."""
import argparse
import time

import torch

import spotckpt

ap = argparse.ArgumentParser()
ap.add_argument("--mb", type=float, default=3.0)
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--every-steps", type=int, default=10)
ap.add_argument("--sleep", type=float, default=0.1)
args = ap.parse_args()
torch.manual_seed(0)
state = {"w": torch.rand(int(args.mb * 2**20 / 4)), "n": 0}
with spotckpt.Checkpointer(state, every_steps=args.every_steps) as ckpt:
    print("training", flush=True)
    for step in ckpt.steps(args.steps):
        state["w"].add_(1e-3)
        state["n"] += 1
        time.sleep(args.sleep)
print("finished", flush=True)
