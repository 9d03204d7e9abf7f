"""Two-rank loop whose only collectives are spotckpt's step-boundary agreements (no DDP), so a
dead peer is noticed by spotckpt, not by a gradient all-reduce."""
import os
import time

import torch
import torch.distributed as dist

import spotckpt

dist.init_process_group("gloo")
state = {"w": torch.zeros(4)}
with spotckpt.Checkpointer(state, every_steps=50) as ckpt:
    print(f"rank {dist.get_rank()} pid {os.getpid()} training", flush=True)
    for step in ckpt.steps(100_000):
        state["w"] += 1
        time.sleep(0.01)
