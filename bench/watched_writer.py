"""An unmodified training script's save, for bench row 8 (``cases_watched.py``): it knows
nothing of spotckpt. It builds a tensor of N bytes, then for each path read from stdin
``torch.save``s it there and prints ``closed <path> <size> <time.time() after the close>``.
It runs until stdin closes (as a training job runs until it ends)."""
from __future__ import annotations

import os
import sys
import time

import torch

torch.set_num_threads(1)
n = int(sys.argv[1])
blob = torch.frombuffer(bytearray(os.urandom(n)), dtype=torch.uint8)
print("ready", flush=True)
for i, line in enumerate(sys.stdin):
    path = line.strip()
    blob[:8] = torch.tensor(list(i.to_bytes(8, "little")), dtype=torch.uint8)  # a new version
    torch.save({"weights": blob}, path)
    t = time.time()
    print(f"closed {path} {os.path.getsize(path)} {t:.6f}", flush=True)
