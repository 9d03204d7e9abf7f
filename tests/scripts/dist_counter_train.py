"""counter_train.py for the ranks of a torch.distributed job (gloo, CPU): a counter per rank
and spotckpt's own step-boundary agreements, no model (starts as fast as torch imports).

    torchrun --nproc-per-node 2 dist_counter_train.py --steps 1000 --every-steps 10 [--sleep 0.01]

Prints ``rank R pid P resumed at step S`` once restored, ``step N`` (rank 0, every 10 steps)
and ``rank R finished N steps``.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

import spotckpt

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--every-steps", type=int, default=10)
ap.add_argument("--sleep", type=float, default=0.01)
args = ap.parse_args()
dist.init_process_group("gloo")
rank = dist.get_rank()
state = {"n": torch.zeros(1, dtype=torch.int64)}
with spotckpt.Checkpointer(state, every_steps=args.every_steps) as ckpt:
    print(f"rank {rank} pid {os.getpid()} resumed at step {ckpt.restored_step}", flush=True)
    for step in ckpt.steps(total=args.steps):
        state["n"] += 1
        if rank == 0 and step % 10 == 0:
            print(f"step {step}", flush=True)
        time.sleep(args.sleep)
assert int(state["n"]) == args.steps, int(state["n"])
print(f"rank {rank} finished {args.steps} steps", flush=True)
dist.destroy_process_group()
