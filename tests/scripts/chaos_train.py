"""A tiny pure-Python training loop that saves at every step (used by the chaos suites).

No torch: startup stays well under a second, so a test can kill and restart it hundreds of
times. The update is deterministic given the saved state: the batch of step ``s`` comes from
``random.Random(s)``, and a noise term comes from the *global* ``random`` state, which
spotckpt saves and restores; a resumed run therefore ends bitwise equal to an uninterrupted
one only if weights, step and RNG state are all restored exactly.

Settings come from the usual ``SPOTCKPT_*`` variables (local dir, remote, keep_last).
Prints ``resumed <step|None>`` once restored, then ``done <step>`` after each step.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import spotckpt

DIM = 8
TRUE_W = [0.5 - 0.125 * i for i in range(DIM)]


def train_step(state: dict, step: int) -> None:
    rng = random.Random(step)
    x = [rng.uniform(-1.0, 1.0) for _ in range(DIM)]
    y = sum(t * xi for t, xi in zip(TRUE_W, x)) + 0.25
    w, b = state["w"], state["b"]
    err = sum(wi * xi for wi, xi in zip(w, x)) + b - y + random.gauss(0.0, 0.01)
    lr = 0.05
    state["w"] = [wi - lr * err * xi for wi, xi in zip(w, x)]
    state["b"] = b - lr * err


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--blob-kb", type=int, default=64, help="static payload ballast")
    ap.add_argument("--hold", type=float, default=0.0, help="sleep this long after restore")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    random.seed(0)
    blob = random.Random(1).randbytes(args.blob_kb * 1024)
    state = {"w": [0.0] * DIM, "b": 0.0, "blob": blob}
    with spotckpt.Checkpointer(state, every_steps=args.every) as ckpt:
        print(f"resumed {ckpt.restored_step}", flush=True)
        if args.hold:
            time.sleep(args.hold)
        for step in ckpt.steps(total=args.total):
            train_step(state, step)
            print(f"done {step}", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
    assert state["blob"] == blob
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"step": ckpt.step, "w": state["w"], "b": state["b"]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
