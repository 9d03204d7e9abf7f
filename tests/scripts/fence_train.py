"""One instance of a job for the split-brain tests (no torch: starts in a fraction of a second).

    python fence_train.py --tag Z --total 40 [--sleep 0.01] [--pause-at K --pause-file F]

Settings come from the ``SPOTCKPT_*`` variables (local dir, remote, keep_last). The state
holds the tag of the instance that trained the last step and a 16 KiB ballast that depends
on it, so two instances never write equal bytes for one step. Prints ``generation G`` once
open (``None`` where there are no generations), ``resumed S``, ``done S`` after each step,
and at the end ``final <who> <digest>``: what a fresh restore must find if this instance
held the newest generation.
--pause-at K --pause-file F: after step K, wait until F exists (the test starts the
replacement meanwhile). --start-file F: wait for F before opening the Checkpointer.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import time

import spotckpt


def digest(state: dict) -> str:
    return hashlib.sha256(repr((state["who"], state["w"], state["blob"])).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--total", type=int, default=40)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--pause-at", type=int, default=-1)
    ap.add_argument("--pause-file", default=None)
    ap.add_argument("--start-file", default=None)
    args = ap.parse_args()
    print("ready", flush=True)
    while args.start_file and not os.path.exists(args.start_file):
        time.sleep(0.005)  # imports done: the test picks the moment this instance starts
    state = {"who": "", "w": 0, "blob": b""}
    with spotckpt.Checkpointer(state, every_steps=1) as ckpt:
        print(f"generation {getattr(ckpt, 'generation', None)}", flush=True)
        print(f"resumed {ckpt.restored_step}", flush=True)
        for step in ckpt.steps(total=args.total):
            state["who"] = args.tag
            state["w"] = state["w"] * 31 + step + ord(args.tag[0])
            state["blob"] = random.Random(f"{args.tag}-{step}").randbytes(16 << 10)
            print(f"done {step}", flush=True)
            if step == args.pause_at and args.pause_file:
                while not os.path.exists(args.pause_file):
                    time.sleep(0.005)
            if args.sleep:
                time.sleep(args.sleep)
    print(f"final {state['who']} {digest(state)}", flush=True)


if __name__ == "__main__":
    main()
