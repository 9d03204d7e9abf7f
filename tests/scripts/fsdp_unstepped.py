"""One rank, FSDP2: a save before the optimizer's first step must leave the optimizer as it
was (no state), and resuming it must give an optimizer without state too. Prints a verdict."""
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import spotckpt

dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
model = nn.Linear(4, 2)
fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
with spotckpt.Checkpointer({"model": model, "optim": opt}, remote=None) as ckpt:
    print("restored", ckpt.restored_step, "state", len(opt.state), flush=True)
    ckpt.save(blocking=True)
    print("after save: state", len(opt.state), flush=True)
dist.destroy_process_group()
