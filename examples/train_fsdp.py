"""FSDP2 (``fully_shard``) training that survives spot interruptions and world-size changes.

    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 200 --out final.pt
    torchrun --nproc-per-node 1 examples/train_fsdp.py --steps 300   # resumes the 2-rank checkpoint

The state holds sharded tensors (DTensor), so spotckpt writes each step through
torch.distributed.checkpoint (DCP): every rank saves its own shards into its part of the
step, and a restart at any world size reshards them. The same world size resumes bitwise.
Set SPOTCKPT_REMOTE for S3.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import spotckpt


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The whole model and optimizer state, gathered on rank 0 (collective)."""
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=o),
            "optim": get_optimizer_state_dict(model, opt, options=o)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every-steps", type=int, default=10)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--out", default=None, help="rank 0 saves the full final state here")
    ap.add_argument("--out-resumed", default=None, help="... and the full state right after resuming")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # same initial weights on every rank
    g = torch.Generator().manual_seed(1234)
    x_all, w_true = torch.randn(1024, 16, generator=g), torch.randn(16, 1, generator=g)
    y_all = torch.tanh(x_all @ w_true)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # per-rank dropout masks
    batch = 32

    with spotckpt.Checkpointer({"model": model, "optim": opt}, every_steps=args.every_steps) as ckpt:
        print(f"rank {rank} pid {os.getpid()} world {world} " +
              (f"resumed at step {ckpt.restored_step}" if ckpt.restored_step is not None else "fresh start"),
              flush=True)
        if args.out_resumed:
            st = full_state(model, opt)
            if rank == 0:
                torch.save(st, args.out_resumed)
        for step in ckpt.steps(total=args.steps):
            perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(step))
            idx = perm[:batch].chunk(world)[rank]  # this rank's share of the global batch
            loss = nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if args.sleep:
                time.sleep(args.sleep)
    st = full_state(model, opt)
    if rank == 0:
        print(f"finished {args.steps} steps", flush=True)
        if args.out:
            torch.save(st, args.out)
    dist.barrier()  # every rank done before any exits: torchrun stops the others when one fails
    dist.destroy_process_group()
    print(f"rank {rank} exiting", flush=True)  # (the tests' mark: only the interpreter's exit is left)


if __name__ == "__main__":
    main()
