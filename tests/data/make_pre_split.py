"""Writes tests/data/pre-split/: a checkpoint and a watched file as spotckpt 0.1.0 wrote them
before the package split (run once, with the code of commit 69297d4; kept for the record).

    python tests/data/make_pre_split.py OUT_DIR

The result (remote/ a file:// remote, 3 committed steps, keep_last=2; a watched file) is what
tests/checkpointer/test_public_api.py restores with today's code.

tests/data/torch-format/ is the same script run with the code of commit 5935ee4 (integrate28,
the last to write the ``torch`` serializer, one ``torch.save`` file, before the
``safetensors`` payload of issue 25).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import spotckpt

out = Path(sys.argv[1]).resolve()
torch.manual_seed(7)
model = torch.nn.Linear(4, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
extra = {"epoch": 2, "name": "pre-split", "history": [0.5, 0.25], "array": np.arange(6, dtype=np.float32)}
with spotckpt.Checkpointer({"model": model, "optim": opt, "extra": extra}, local_dir=out / "local",
                           remote=(out / "remote").as_uri() + "/", every_steps=2, keep_last=2) as ckpt:
    for step in ckpt.steps(total=6):
        loss = model(torch.full((2, 4), float(step))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        extra["epoch"] = step
    (out / "local" / "notes.txt").write_text("written by the script itself\n")
print("version", spotckpt.__version__, "restored", ckpt.restored_step)
torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, out / "expected.pt")
