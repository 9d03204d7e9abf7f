"""A pure-Python loop under a Checkpointer (no torch: starts in a fraction of a second).

    python counter_train.py --steps 1000 --every-steps 50 [--sleep 0.01] [--gate FILE]

--gate FILE: the restore blocks inside ``load_state_dict`` until FILE exists, after printing
"restoring": a deterministic window for a signal during ``Checkpointer.open()``.
"""
import argparse
import os
import time

import spotckpt


class Counter:
    def __init__(self, gate: str | None) -> None:
        self.n, self.gate = 0, gate

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        if self.gate:
            print("restoring", flush=True)
            while not os.path.exists(self.gate):
                time.sleep(0.01)
        self.n = sd["n"]


ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--every-steps", type=int, default=50)
ap.add_argument("--sleep", type=float, default=0.01)
ap.add_argument("--gate", default=None)
args = ap.parse_args()
state = {"counter": Counter(args.gate)}
with spotckpt.Checkpointer(state, every_steps=args.every_steps) as ckpt:
    print(f"resumed at step {ckpt.restored_step}", flush=True)
    for step in ckpt.steps(total=args.steps):
        state["counter"].n += 1
        if step % 10 == 0:
            print(f"step {step}", flush=True)
        time.sleep(args.sleep)
assert state["counter"].n == args.steps, state["counter"].n
print(f"finished {args.steps} steps", flush=True)
