"""Two ranks with every="auto" (no DDP): every rank decides from rank 0's history. Prints
one JSON line per rank with what it decided from."""
import json
import time

import torch
import torch.distributed as dist

import spotckpt

dist.init_process_group("gloo")
state = {"w": torch.zeros(4)}
with spotckpt.Checkpointer(state, every="auto", min_interval=0.05, max_interval=0.2) as ckpt:
    for step in ckpt.steps(40):
        state["w"] += 1
        time.sleep(0.01)
    a = ckpt._auto
    print(json.dumps({"rank": dist.get_rank(), "note": a.history_note, "incarnations": a.summary()["incarnations"],
                      "interval": a.decision.interval, "saved": ckpt._last_saved}), flush=True)
dist.barrier()
dist.destroy_process_group()
