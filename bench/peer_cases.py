"""One contender, one fresh process: ``python bench/peer_cases.py ACTION '<json>'``.

- ``save``: ``reps`` saves of the same state, each waited durable before the next: the
  training-thread stall of each (the call) and its save -> durable time; the first save
  (buffers allocated, clients built) is reported apart. Then, when ``loop_seconds`` is given,
  the CPU-bound loop alone and the same loop saving every ``interval`` seconds (a save that
  comes due while the previous one is not durable yet first waits for it, in the training
  thread: the same rule for every contender, so all save as often).
- ``restore``: an empty local dir to the newest checkpoint loaded into a model that exists.
  Before the clock: ``torch``, ``boto3`` and the contender's own top-level module imported
  (as a script would at its top), the garbage collection those imports left pending run,
  the model allocated; everything else (clients, lazy imports, listings) is inside it.

Prints one line ``RESULT <json>`` (as ``cases.py``). ``make bench`` forks each case from a
warm parent per contender (``bench/zygote.py``) that has run ``prepare(name)``: the imports
every case makes before its clock, paid once per contender instead of once per case. Run
directly, a case is a fresh process and measures the same (checked: bench/zygote.py).
"""
from __future__ import annotations

import gc
import json
import sys
from typing import Any

from common import MiB, cpu_seconds, make_state, median, now, workdir  # noqa: F401
from peers import SAVERS, Model, remove, restore, s3fs_defaults


def prepare(name: str) -> None:
    """What a case of contender ``name`` imports before any clock (as a script would at its
    top): ``torch``, ``boto3`` and the contender's own top-level module; nothing more, so a
    library's lazy imports stay inside the clock of a forked case too."""
    import boto3  # noqa: F401
    import torch  # noqa: F401

    if name == "spotckpt":
        import spotckpt  # noqa: F401
    elif name.startswith("dcp"):
        import torch.distributed.checkpoint  # noqa: F401
    elif name.startswith("lightning"):
        import lightning.pytorch  # noqa: F401
    elif name == "s3fs_save":
        import fsspec  # noqa: F401
    elif name.startswith("s3torch"):
        import s3torchconnector  # noqa: F401
        if name == "s3torch_dcp":
            import s3torchconnector.dcp  # noqa: F401


def _loop(steps: int, step: Any, peer: Any = None, interval: float = 0.0) -> tuple[float, int]:
    saves, t0 = 0, now()
    due = t0 + interval
    for _ in range(steps):
        step()
        if peer is not None and now() >= due:
            if peer.busy():
                peer.wait()  # the previous save first: every contender saves as often
            due = now() + interval
            peer.save()
            saves += 1
    return now() - t0, saves


def case_save(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cases import _one_step

    torch.set_num_threads(1)
    name = p["name"]
    prepare(name)
    s3fs_defaults()
    model = Model(make_state(p["bytes"]))
    wd = workdir()
    out: dict[str, Any] = {"name": name, "bytes": p["bytes"]}
    peer = SAVERS[name](model, p["bucket"], p["prefix"], wd)
    try:
        stalls, durable, cpus = [], [], []
        for _ in range(p["reps"] + 1):
            t, c = now(), cpu_seconds()  # (every thread of this process: the uploads' too)
            peer.save()
            stalls.append(now() - t)
            peer.wait()
            durable.append(now() - t)
            cpus.append(cpu_seconds() - c)
        out.update(stall_first=stalls[0], durable_first=durable[0], stalls=stalls[1:], durables=durable[1:],
                   cpu_first=cpus[0], cpus=cpus[1:])
        if stalls[1:]:
            out.update(stall=median(stalls[1:]), durable=median(durable[1:]), durable_cpu=median(cpus[1:]))
        if p.get("loop_seconds") or p.get("loop_steps"):
            # the same step count for every contender (given), the loop alone and saving, alternated
            steps = p.get("loop_steps") or max(50, int(p["loop_seconds"] / (_loop(30, _one_step)[0] / 30)))
            bases, ckpts, saves = [], [], []
            for _ in range(p.get("loop_pairs", 1)):
                bases.append(_loop(steps, _one_step)[0])
                t, n = _loop(steps, _one_step, peer, p["interval"])
                peer.wait()
                ckpts.append(t)
                saves.append(n)
            base, ckpt = median(bases), median(ckpts)
            out.update(loop_base=base, loop_ckpt=ckpt, loop_saves=median(saves), loop_steps=steps,
                       slowdown=ckpt / base - 1, loop_bases=bases, loop_ckpts=ckpts)
    finally:
        peer.close()
        remove(wd)
    return out


def case_restore(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    name = p["name"]
    prepare(name)
    s3fs_defaults()
    sd = make_state(p["bytes"])
    want = {k: float(v[:4].sum()) for k, v in sd.items()}
    for v in sd.values():
        v.zero_()  # the model exists, its memory touched; the checkpoint's values are not there
    model = Model(sd)
    wd = workdir()
    # The collection a large import leaves pending (Lightning's: ~0.4 s at 64 MiB) runs here,
    # not inside the clock: it is the import's cost, and the imports are before the clock.
    gc.collect()
    try:
        t, c = now(), cpu_seconds()
        restore(name, model, p["bucket"], p["prefix"], wd / "dir")
        dt, cpu = now() - t, cpu_seconds() - c
    finally:
        remove(wd)
    got = {k: float(v[:4].sum()) for k, v in sd.items()}
    assert got == want, (name, "restored values differ")
    return {"name": name, "seconds": dt, "cpu": cpu, "bytes": p["bytes"]}


CASES = {"save": case_save, "restore": case_restore}

if __name__ == "__main__":
    action, params = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    print("RESULT " + json.dumps(CASES[action](params)), flush=True)
