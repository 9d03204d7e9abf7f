"""A training job for the schedule tests and bench/schedule.py: steps that sleep, a numpy
state of a given size, ``every="auto"`` or a fixed ``every_seconds``.

Settings by environment: AUTO_STEPS (total steps), AUTO_STEP_S (seconds per step),
AUTO_STATE_MB, AUTO_EVERY (``auto`` or seconds), AUTO_MIN / AUTO_MAX (every="auto"'s
bounds, seconds), AUTO_MTBF (its prior, hours), AUTO_PROGRESS (a file: ``start <pid> <wall>
<step>`` when the loop starts, ``step <pid> <wall> <step>`` after each step).
"""
from __future__ import annotations

import os
import time

import numpy as np

import spotckpt

env = os.environ.get
steps, step_s = int(env("AUTO_STEPS", "100")), float(env("AUTO_STEP_S", "0.05"))
every = env("AUTO_EVERY", "auto")
kw: dict = {"every": "auto"} if every == "auto" else {"every_seconds": float(every)}
if every == "auto":
    for name, var in (("min_interval", "AUTO_MIN"), ("max_interval", "AUTO_MAX"), ("mtbf", "AUTO_MTBF")):
        if env(var):
            kw[name] = float(env(var))
state = {"w": np.zeros(max(1, int(float(env("AUTO_STATE_MB", "1")) * 2**20) // 8)), "done": 0}
progress = env("AUTO_PROGRESS")
log = open(progress, "a", buffering=1) if progress else None
with spotckpt.Checkpointer(state, **kw) as ckpt:
    if log:
        log.write(f"start {os.getpid()} {time.time():.4f} {ckpt.step}\n")
    for step in ckpt.steps(total=steps):
        time.sleep(step_s)
        state["w"][step % state["w"].size] += 1.0
        state["done"] = step + 1
        if log:
            log.write(f"step {os.getpid()} {time.time():.4f} {step + 1}\n")
print(f"done at step {ckpt.step}", flush=True)
