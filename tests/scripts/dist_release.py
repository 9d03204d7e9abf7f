"""One rank, FSDP2 (a sharded state: spotckpt makes its agreement group and DCP's io group).
After the ``with`` block, spotckpt's process groups must be destroyed and their gloo threads
joined, and the Checkpointer (with the state it holds) freed without the cycle collector:
left to the interpreter's exit, a gloo worker that still releases a collective's tensors
needs the GIL of a finalizing interpreter, and the process aborts (std::terminate).
Prints one verdict line per check."""
import gc
import os
import sys
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import spotckpt


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


gc.disable()  # what is freed below is freed by reference counts, as at the end of a script
dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
model = nn.Linear(4, 2)
fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
before = threads()
ckpt = spotckpt.Checkpointer({"model": model, "optim": opt}, remote=None, every_steps=1)
with ckpt:
    for step in ckpt.steps(total=2):
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
    groups = [weakref.ref(g) for g in (ckpt._dist.group, ckpt._dist.io_group)]
    print("groups made", len(groups), "threads", threads() - before, flush=True)
print("threads left", threads() - before, flush=True)
print("groups registered", sum(g() in dist.distributed_c10d._world.pg_map for g in groups if g() is not None),
      flush=True)
print("groups alive", sum(g() is not None for g in groups), flush=True)
alive = weakref.ref(ckpt)
del ckpt
print("checkpointer alive", int(alive() is not None), flush=True)
dist.destroy_process_group()
