"""CPU-seconds per GiB saved, against the machine's floor measured in the same process (issue 25).

The floor is what any save of these bytes must pay on this machine: a memcpy of the state
into buffers already touched (the snapshot), one XXH3 pass over it, writing it into the
page cache, the fsync, and the client side of one PUT of it (boto3 ``put_object`` of the
file just written, with the client settings every bench client uses). spotckpt's figure is
the process's CPU (every thread: user + system) from ``save()`` to ``flush()`` returning
with the checkpoint durable on the remote, the snapshot's buffers already allocated (as
after a first save). Each figure is the minimum over ``reps``.

    python bench/cases.py savecpu '{"bytes": 268435456, "reps": 3}'   # needs AWS_ENDPOINT_URL_S3
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from common import checkpointer, client, cpu_seconds, drop_bucket, make_state, new_bucket, now, workdir

GiB = 1 << 30


def _floor(tensors: list[Any], wd: Any, bucket: str, reps: int) -> dict[str, float]:
    import torch
    import xxhash

    dst = [torch.empty_like(t) for t in tensors]
    for d, t in zip(dst, tensors):
        d.copy_(t)  # touched once: the snapshot pool's steady state
    views = [memoryview(d.numpy()).cast("B") for d in dst]
    c = client()
    parts: dict[str, list[float]] = {k: [] for k in ("memcpy", "xxh3", "write", "fsync", "put")}
    put_wall = []
    path = wd / "floor.bin"
    for _ in range(reps):
        c0 = cpu_seconds()
        for d, t in zip(dst, tensors):
            d.copy_(t)
        c1 = cpu_seconds()
        h = xxhash.xxh3_128()
        for v in views:
            h.update(v)
        h.hexdigest()
        c2 = cpu_seconds()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for v in views:
            while v:
                v = v[os.write(fd, v):]
        c3 = cpu_seconds()
        os.fsync(fd)
        os.close(fd)
        c4 = cpu_seconds()
        t = now()
        with open(path, "rb") as f:
            c.put_object(Bucket=bucket, Key="floor", Body=f)
        put_wall.append(now() - t)
        c5 = cpu_seconds()
        for k, a, b in (("memcpy", c0, c1), ("xxh3", c1, c2), ("write", c2, c3), ("fsync", c3, c4), ("put", c4, c5)):
            parts[k].append(b - a)
        c.delete_object(Bucket=bucket, Key="floor")
        path.unlink()
    out = {k: min(v) for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["put_wall"] = min(put_wall)
    return out


def case_savecpu(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    n, reps = p["bytes"], p["reps"]
    state = make_state(n)
    wd, bucket = workdir(), new_bucket()
    cpu, wall = [], []
    try:
        floor = _floor(list(state.values()), wd, bucket, reps)
        with checkpointer({"model": state}, wd / "ck", f"s3://{bucket}/run/", every_steps=10**9) as ck:
            it = ck.steps(total=reps + 2)
            next(it)
            ck.save()  # the first save allocates the snapshot buffers: not measured
            assert ck.flush()
            for _ in range(reps):
                next(it)
                c0, t0 = cpu_seconds(), now()
                ck.save()
                assert ck.flush()
                cpu.append(cpu_seconds() - c0)
                wall.append(now() - t0)
            it.close()
            import spotckpt._state._snapshot as snap

            serializer = snap.serializer_name()
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    g = n / GiB
    return {"bytes": n, "serializer": serializer, "cpu": cpu, "wall": wall,
            "cpu_per_gib": min(cpu) / g, "floor_per_gib": floor["total"] / g,
            "floor": {k: v / g for k, v in floor.items() if k != "put_wall"},
            "save_wall": min(wall), "put_wall": floor["put_wall"], "load": os.getloadavg()[0]}
