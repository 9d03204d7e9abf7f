"""One benchmark case per call, each with its baseline measured in the same process.

Run by ``bench/run.py`` as ``python bench/cases.py CASE '<json params>'`` on the client core,
with the S3 server's endpoint and credentials in the environment. Prints one line
``RESULT <json>``. Every S3 client here (baseline boto3 and spotckpt's) uses the same
botocore settings: ``CONFIG_KWARGS`` below.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Over plain http botocore SHA-256s every payload for the signature; over https (real S3)
# it does not. Both sides here are told not to, so loopback costs what https costs.
CONFIG_KWARGS: dict[str, Any] = {"s3": {"payload_signing_enabled": False}, "max_pool_connections": 16}
STORAGE_OPTIONS = {"config_kwargs": CONFIG_KWARGS}
MiB = 1 << 20


# -- helpers ----------------------------------------------------------------------------------
def now() -> float:
    return time.perf_counter()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def endpoint() -> str:
    return os.environ["AWS_ENDPOINT_URL_S3"]


def client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint(), region_name="us-east-1", config=Config(**CONFIG_KWARGS))


def new_bucket() -> str:
    name = f"bench-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=name)
    return name


def drop_bucket(name: str) -> None:
    c = client()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
        for o in page.get("Contents", []):
            c.delete_object(Bucket=name, Key=o["Key"])
    for up in c.list_multipart_uploads(Bucket=name).get("Uploads", []):
        c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    c.delete_bucket(Bucket=name)


def transfer_manager(part_mib: int, concurrency: int) -> Any:
    from s3transfer.manager import TransferConfig, TransferManager

    conf = TransferConfig(multipart_threshold=part_mib * MiB, multipart_chunksize=part_mib * MiB,
                          max_request_concurrency=concurrency)
    return TransferManager(client(), conf)


def raw_upload(path: str, bucket: str, key: str, part_mib: int, concurrency: int) -> float:
    """The baseline: a boto3 (s3transfer) multipart upload of a file already on disk."""
    m = transfer_manager(part_mib, concurrency)
    t = now()
    m.upload(path, bucket, key).result()
    dt = now() - t
    m.shutdown()
    return dt


def make_state(nbytes: int, pieces: int = 16) -> dict[str, Any]:
    """``nbytes`` of float32 tensors, in ``pieces`` tensors: a model's state_dict stand-in."""
    import torch

    n = nbytes // 4 // pieces
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(n, generator=g) for i in range(pieces)}


def memcpy_seconds(tensors: list[Any], reps: int = 5) -> float:
    """Median time to memcpy the tensors' bytes into preallocated, already touched buffers."""
    import numpy as np

    srcs = [t.numpy().view(np.uint8) for t in tensors]
    dsts = [np.empty_like(s) for s in srcs]
    for s, d in zip(srcs, dsts):
        np.copyto(d, s)  # touch every page once
    times = []
    for _ in range(reps):
        t = now()
        for s, d in zip(srcs, dsts):
            np.copyto(d, s)
        times.append(now() - t)
    return median(times)


def serialized_file(state: dict[str, Any], path: Path) -> int:
    """The bytes spotckpt would upload for ``state`` (its own serialiser), at ``path``."""
    from spotckpt import _state

    path.parent.mkdir(parents=True, exist_ok=True)
    snap = _state.snapshot({"model": state})
    entries = _state.write_state(path.parent, snap, _state.serializer_name())
    os.replace(path.parent / entries[0].path, path)
    return entries[0].size


def checkpointer(state: dict[str, Any], local: Path, remote: str | None, **kw: Any) -> Any:
    import spotckpt

    kw.setdefault("keep_last", 2)
    kw.setdefault("grace_seconds", 600)
    return spotckpt.Checkpointer(state, local_dir=local, remote=remote,
                                 storage_options=STORAGE_OPTIONS if remote else None, **kw)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="spotckpt-bench-", dir=os.environ.get("BENCH_TMP")))


# -- cases ------------------------------------------------------------------------------------
def case_stall(p: dict[str, Any]) -> dict[str, Any]:
    """#1 training-thread stall per save(), and torch.save to local disk for reference."""
    import torch

    torch.set_num_threads(1)
    n, reps = p["bytes"], p["reps"]
    state = make_state(n)
    wd, bucket = workdir(), new_bucket()
    stalls: list[float] = []
    try:
        with checkpointer({"model": state}, wd / "ckpt", f"s3://{bucket}/run/") as ck:
            for _ in ck.steps(total=reps + 1):
                ck.flush()  # the previous save is durable: this measures the stall alone
                t = now()
                ck.save()
                stalls.append(now() - t)
            ck.flush()
        base = memcpy_seconds(list(state.values()))
        ts = []
        for i in range(p.get("torch_save_reps", 2)):
            from spotckpt import _state

            snap = _state.snapshot({"model": state})
            f = wd / f"plain-{i}.pt"
            t = now()
            with open(f, "wb") as fh:
                torch.save(snap, fh)
                fh.flush()
                os.fsync(fh.fileno())
            ts.append(now() - t)
            f.unlink()
            del snap
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    return {"stall_first": stalls[0], "stall": median(stalls[1:]), "stalls": stalls,
            "memcpy": base, "torch_save": median(ts), "bytes": n}


_AB: list[Any] = []


def _one_step() -> None:
    """A CPU-bound training step stand-in (one thread, a few ms)."""
    import torch

    if not _AB:
        _AB.extend([torch.rand(384, 384), torch.rand(384, 384)])
    a, b = _AB
    for _ in range(8):
        a = torch.tanh(a @ b)


def _idle_step() -> None:
    """A step that leaves the CPU idle, as when the GPU computes and the host waits."""
    time.sleep(0.004)


def _plain_loop(steps: int, step: Callable[[], None] = _one_step) -> tuple[float, float]:
    t, c = now(), cpu_seconds()
    for _ in range(steps):
        step()
    return now() - t, cpu_seconds() - c


def case_slowdown(p: dict[str, Any]) -> dict[str, Any]:
    """#2 the same loop with and without a save every ``interval`` seconds, alternated."""
    import torch

    torch.set_num_threads(1)
    n, interval, seconds, pairs = p["bytes"], p["interval"], p["seconds"], p["pairs"]
    work = _one_step if p.get("work", "cpu") == "cpu" else _idle_step
    steps = max(50, int(seconds / (_plain_loop(50, work)[0] / 50)))
    state = make_state(n)
    base, ckpt, saves, extra_cpu = [], [], [], []
    wd, bucket = workdir(), new_bucket()
    try:
        for rep in range(pairs):
            bt, bc = _plain_loop(steps, work)
            base.append(bt)
            local = wd / f"ckpt{rep}"
            with checkpointer({"model": state}, local, f"s3://{bucket}/run{rep}/",
                              every_seconds=interval) as ck:
                ck.save()  # steady state: the snapshot buffers exist, as after a first save
                assert ck.flush()
                first = ck.step
                t0 = t1 = now()
                c0 = c1 = cpu_seconds()
                for step in ck.steps(total=first + steps):
                    work()
                    if step == first + steps - 1:
                        t1, c1 = now(), cpu_seconds()  # before steps()' final save
                ck.flush()
                saves.append(sum(1 for e in _events(local) if e.get("event") == "saved") - 1)
            ckpt.append(t1 - t0)
            extra_cpu.append((c1 - c0 - bc) / max(1, saves[-1]))
            shutil.rmtree(local, ignore_errors=True)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    b, c = median(base), median(ckpt)
    return {"base": b, "ckpt": c, "slowdown": c / b - 1, "bases": base, "ckpts": ckpt, "saves": saves,
            "steps": steps, "bytes": n, "interval": interval, "work": p.get("work", "cpu"),
            "cpu_per_save": median(extra_cpu), "cpu_per_gib": median(extra_cpu) * (1 << 30) / n}


def _events(local: Path) -> list[dict[str, Any]]:
    f = local / ".spotckpt.sagemaker-ignore" / "events.jsonl"
    try:
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    except OSError:
        return []


def case_upload(p: dict[str, Any]) -> dict[str, Any]:
    """#3 save() to manifest committed vs a tuned raw boto3 upload of the same bytes."""
    import torch

    torch.set_num_threads(1)
    n, reps = p["bytes"], p["reps"]
    state = make_state(n)
    wd, bucket = workdir(), new_bucket()
    c = client()
    try:
        size = serialized_file(state, wd / "blob" / "state.pt")
        sweep: dict[str, list[float]] = {}
        for part, conc in p["sweep"]:
            for r in range(p["sweep_reps"]):
                sweep.setdefault(f"{part}x{conc}", []).append(
                    raw_upload(str(wd / "blob" / "state.pt"), bucket, "raw/state.pt", part, conc))
                c.delete_object(Bucket=bucket, Key="raw/state.pt")
        best = min(sweep, key=lambda k: median(sweep[k]))
        part, conc = (int(x) for x in best.split("x"))
        base = sweep[best][:]
        while len(base) < reps:
            base.append(raw_upload(str(wd / "blob" / "state.pt"), bucket, "raw/state.pt", part, conc))
            c.delete_object(Bucket=bucket, Key="raw/state.pt")
        (wd / "blob" / "state.pt").unlink()
        times = []
        with checkpointer({"model": state}, wd / "ckpt", f"s3://{bucket}/run/") as ck:
            it = ck.steps(total=reps + 2)
            next(it)
            ck.save()
            assert ck.flush()
            for _ in range(reps):
                next(it)
                t = now()
                ck.save()
                assert ck.flush()
                times.append(now() - t)
            it.close()
            ev = _events(wd / "ckpt")
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    b, s = median(base), median(times)
    writes = [e["write_s"] for e in ev if e.get("event") == "saved"][1:]
    uploads = [e["seconds"] for e in ev if e.get("event") == "upload_done"][1:]
    return {"write": median(writes) if writes else None, "upload_stage": median(uploads) if uploads else None,
            "base": b, "spotckpt": s, "ratio": b / s, "base_mbps": size / b / 1e6, "mbps": size / s / 1e6,
            "best": best, "sweep": {k: median(v) for k, v in sweep.items()}, "bytes": size,
            "times": times, "bases": base}


def case_sigterm(p: dict[str, Any]) -> dict[str, Any]:
    """#4 SIGTERM to a durable committed checkpoint vs snapshot + raw boto3 upload."""
    import torch

    torch.set_num_threads(1)
    n, reps, part, conc = p["bytes"], p["reps"], p["part"], p["conc"]
    state = make_state(n)
    wd, bucket = workdir(), new_bucket()
    c = client()
    times, base_up = [], []
    try:
        size = serialized_file(state, wd / "blob" / "state.pt")
        for _ in range(reps):
            base_up.append(raw_upload(str(wd / "blob" / "state.pt"), bucket, "raw/state.pt", part, conc))
            c.delete_object(Bucket=bucket, Key="raw/state.pt")
        (wd / "blob" / "state.pt").unlink()
        memcpy = memcpy_seconds(list(state.values()))
        for rep in range(reps):
            local = wd / f"ckpt{rep}"
            t0 = None
            try:
                with checkpointer({"model": state}, local, f"s3://{bucket}/run{rep}/") as ck:
                    for step in ck.steps(total=10**9):
                        if step == 1:
                            ck.save()  # a periodic save came before, as in a real run
                            assert ck.flush()
                        if step == 3:
                            t0 = now()
                            os.kill(os.getpid(), signal.SIGTERM)
                        time.sleep(0.002)
            except SystemExit as e:
                assert e.code == 143, e.code
            dt = now() - t0
            got = json.loads(c.get_object(Bucket=bucket, Key=f"run{rep}/step-000000000004/MANIFEST.json")["Body"].read())
            assert got["step"] == 4
            times.append(dt)
            shutil.rmtree(local, ignore_errors=True)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    base = memcpy + median(base_up)
    s = median(times)
    return {"base": base, "memcpy": memcpy, "upload": median(base_up), "spotckpt": s, "ratio": s / base,
            "limit": 1.1 * base + 0.5, "bytes": size, "times": times}


def case_restore_setup(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    state = make_state(p["bytes"])
    wd = workdir()
    try:
        with checkpointer({"model": state}, wd / "ckpt", p["remote"]) as ck:
            ck.save()
            assert ck.flush()
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return {}


def case_restore_base(p: dict[str, Any]) -> dict[str, Any]:
    """#5 baseline: boto3 ranged parallel download + torch.load, in a fresh process."""
    import torch

    torch.set_num_threads(1)
    m = transfer_manager(p["part"], p["conc"])
    wd = workdir()
    rss0 = proc_status("VmRSS")
    t = now()
    m.download(p["bucket"], p["key"], str(wd / "state.pt")).result()
    sd = torch.load(wd / "state.pt", map_location="cpu", weights_only=True)
    dt = now() - t
    assert sd["model"]
    peak = proc_status("VmHWM") - rss0
    m.shutdown()
    shutil.rmtree(wd, ignore_errors=True)
    return {"seconds": dt, "peak": peak}


def case_restore_spot(p: dict[str, Any]) -> dict[str, Any]:
    """#5 spotckpt: empty local dir to state loaded (Checkpointer entry), in a fresh process."""
    import torch

    import spotckpt  # noqa: F401 - imported before the clock starts, like the baseline's boto3

    torch.set_num_threads(1)
    client()  # boto3 imported, as in the baseline
    wd = workdir()
    state: dict[str, Any] = {"model": {}}
    rss0 = proc_status("VmRSS")
    t = now()
    ck = checkpointer(state, wd / "ckpt", p["remote"])
    ck.open()
    dt = now() - t
    assert ck.restored_step is not None and state["model"]
    peak = proc_status("VmHWM") - rss0
    ck.close()
    shutil.rmtree(wd, ignore_errors=True)
    return {"seconds": dt, "peak": peak}


def case_small(p: dict[str, Any]) -> dict[str, Any]:
    """#6 a 1 MiB model (no torch: the pickle-safe serialiser) save to durable vs one put_object."""
    assert "torch" not in sys.modules
    n, reps = p["bytes"], p["reps"]
    payload = bytearray(os.urandom(n))
    wd, bucket = workdir(), new_bucket()
    c = client()
    base, times = [], []
    try:
        for i in range(reps + 3):
            t = now()
            c.put_object(Bucket=bucket, Key=f"raw/model-{i}.ubj", Body=bytes(payload))
            base.append(now() - t)
        base = base[3:]
        with checkpointer({"booster": payload}, wd / "ckpt", f"s3://{bucket}/run/", framework="xgboost") as ck:
            it = ck.steps(total=reps + 5)
            for i in range(reps + 3):
                next(it)
                payload[:8] = os.urandom(8)
                assert ck.flush()
                step = ck.step
                t = now()
                ck.save()
                while ck.durable_step != step:
                    if ck.last_error is not None:
                        raise ck.last_error
                    time.sleep(0.0002)
                times.append(now() - t)
            it.close()
        times = times[3:]
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    b, s = median(base), median(times)
    return {"base": b, "spotckpt": s, "ratio": s / b, "bytes": n, "times": times}


def _moto(path: str) -> str:
    with urllib.request.urlopen(urllib.request.Request(endpoint() + path, method="POST"), timeout=30) as r:
        return r.read().decode()


def case_idle(p: dict[str, Any]) -> dict[str, Any]:
    """#7 an idle Syncer over a local dir of ``files`` already-mirrored files: CPU and requests."""
    files, seconds = p["files"], p["seconds"]
    wd, bucket = workdir(), new_bucket()
    local = wd / "ckpt"
    mirrored = {}
    try:
        for i in range(files):
            rel = f"logs/d{i // 100:03d}/f{i % 100:03d}.txt"
            f = local / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"x" * 64)
            st = f.stat()
            mirrored[rel] = [st.st_size, st.st_mtime_ns]
        # As left by an earlier run that uploaded them all (the Syncer's own record).
        meta = local / ".spotckpt.sagemaker-ignore"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / "mirror.json").write_text(json.dumps(mirrored))
        with checkpointer({"x": 1}, local, f"s3://{bucket}/run/") as ck:
            time.sleep(p.get("settle", 3.0))
            _moto("/moto-api/recorder/reset-recording")
            _moto("/moto-api/recorder/start-recording")
            c0, t0 = cpu_seconds(), now()
            time.sleep(seconds)
            cpu, wall = cpu_seconds() - c0, now() - t0
            _moto("/moto-api/recorder/stop-recording")
            rec = _moto("/moto-api/recorder/download-recording")
            requests = len([x for x in rec.splitlines() if x.strip()])
            ck.save()  # leave cleanly
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    return {"cpu_percent": 100 * cpu / wall, "requests": requests, "files": files, "seconds": wall}


CASES = {k[5:]: v for k, v in globals().items() if k.startswith("case_")}

if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    out = CASES[name](params)
    print("RESULT " + json.dumps(out), flush=True)
