"""One benchmark case per call, each with its baseline measured in the same process.

Run by ``bench/run.py`` as ``python bench/cases.py CASE '<json params>'`` on the client core,
with the S3 server's endpoint and credentials in the environment. Prints one line
``RESULT <json>``. Every S3 client here (baseline boto3 and spotckpt's) uses the same
botocore settings: ``CONFIG_KWARGS`` in ``common.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from common import (MiB, checkpointer, client, cpu_seconds, drop_bucket, endpoint, make_state, median,  # noqa: F401
                    memcpy_seconds, new_bucket, now, proc_status, raw_upload, serialized_file,
                    transfer_manager, workdir)
from spotckpt._commit._local import LocalDir


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
            from spotckpt._state import _snapshot as _state

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
    f = LocalDir(local).meta / "events.jsonl"
    try:
        return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    except OSError:
        return []


def _raw_rotating(path: str, bucket: str, prefix: str, i: int, keep: int, part: int, conc: int) -> float:
    """Raw upload ``i`` to ``prefix/i``, then delete ``prefix/(i-keep)``: while it runs the
    server holds ``keep`` earlier copies, as it holds spotckpt's ``keep_last`` checkpoints
    (moto keeps objects in memory and slows down as it holds more; measured)."""
    dt = raw_upload(path, bucket, f"{prefix}/{i}", part, conc)
    if i >= keep:
        client().delete_object(Bucket=bucket, Key=f"{prefix}/{i - keep}")
    return dt


def case_upload(p: dict[str, Any]) -> dict[str, Any]:
    """#3 save() to manifest committed vs a tuned raw boto3 upload of the same bytes.

    First a sweep of the raw upload's part size x concurrency (empty server) picks the
    baseline's settings. Then baseline and spotckpt alternate, each run with the server
    holding the same data: spotckpt keeps ``keep_last=2`` checkpoints, the baseline its two
    previous uploads."""
    import torch

    torch.set_num_threads(1)
    n, reps, keep = p["bytes"], p["reps"], 2
    state = make_state(n)
    wd, bucket = workdir(), new_bucket()
    c = client()
    blob = str(wd / "blob" / "state.pt")
    try:
        size = serialized_file(state, wd / "blob" / "state.pt")
        sweep: dict[str, list[float]] = {}
        for part, conc in p["sweep"]:
            for r in range(p["sweep_reps"]):
                sweep.setdefault(f"{part}x{conc}", []).append(raw_upload(blob, bucket, "raw/state.pt", part, conc))
                c.delete_object(Bucket=bucket, Key="raw/state.pt")
        best = min(sweep, key=lambda k: median(sweep[k]))
        part, conc = (int(x) for x in best.split("x"))
        base, times, fresh_base = [], [], []
        fresh = wd / "fresh" / "state.pt"
        with checkpointer({"model": state}, wd / "ckpt", f"s3://{bucket}/run/", keep_last=keep) as ck:
            it = ck.steps(total=reps + keep + 1)
            for i in range(keep):  # the server holds keep checkpoints and keep raw copies
                next(it)
                ck.save()
                assert ck.flush()
                _raw_rotating(blob, bucket, "raw", i, keep, part, conc)
            for r in range(reps):
                base.append(_raw_rotating(blob, bucket, "raw", keep + r, keep, part, conc))
                # reference (row 3r): the same upload of a file written just before, untimed
                serialized_file(state, fresh)
                fresh_base.append(raw_upload(str(fresh), bucket, "fresh", part, conc))
                fresh.unlink()
                c.delete_object(Bucket=bucket, Key="fresh")
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
    writes = [e["write_s"] for e in ev if e.get("event") == "saved"][keep:]
    uploads = [e["seconds"] for e in ev if e.get("event") == "upload_done"][keep:]
    return {"write": median(writes) if writes else None, "upload_stage": median(uploads) if uploads else None,
            "base": b, "spotckpt": s, "ratio": b / s, "base_mbps": size / b / 1e6, "mbps": size / s / 1e6,
            "best": best, "sweep": {k: median(v) for k, v in sweep.items()}, "bytes": size,
            "times": times, "bases": base, "held": keep,
            "base_fresh": median(fresh_base), "fresh": fresh_base}


def case_sigterm(p: dict[str, Any]) -> dict[str, Any]:
    """#4 SIGTERM to a durable committed checkpoint vs snapshot + raw boto3 upload.

    Each rep: the baseline's raw upload, with the server holding one earlier copy, then a run
    that saves one periodic checkpoint and gets SIGTERM two steps later (the server holds
    that checkpoint while the interruption save uploads). Everything is deleted between reps.
    For reference, a second baseline uploads a file written just before (``torch.save`` +
    fsync, not timed): on this VM fresh memory is slow to touch, and a 1 GiB file just
    written slows the server's next intake, which every checkpoint written then pays."""
    import torch

    torch.set_num_threads(1)
    n, reps, part, conc = p["bytes"], p["reps"], p["part"], p["conc"]
    state = make_state(n)
    wd, bucket = workdir(), new_bucket()
    c = client()
    blob = str(wd / "blob" / "state.pt")
    times, base_up, fresh_up = [], [], []
    try:
        size = serialized_file(state, wd / "blob" / "state.pt")
        memcpy = memcpy_seconds(list(state.values()))
        for rep in range(reps):
            raw_upload(blob, bucket, "raw/0", part, conc)  # the server holds one earlier copy
            base_up.append(raw_upload(blob, bucket, "raw/1", part, conc))
            c.delete_object(Bucket=bucket, Key="raw/1")
            fresh = wd / "fresh.pt"
            serialized_file(state, fresh)
            fresh_up.append(raw_upload(str(fresh), bucket, "raw/1", part, conc))
            fresh.unlink()
            for k in ("raw/0", "raw/1"):  # the server holds nothing of the baselines' now
                c.delete_object(Bucket=bucket, Key=k)
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
            for o in c.list_objects_v2(Bucket=bucket, Prefix=f"run{rep}/").get("Contents", []):
                c.delete_object(Bucket=bucket, Key=o["Key"])
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    base = memcpy + median(base_up)
    s = median(times)
    return {"base": base, "memcpy": memcpy, "upload": median(base_up), "spotckpt": s, "ratio": s / base,
            "limit": 1.1 * base + 0.5, "bytes": size, "times": times, "bases": base_up,
            "upload_fresh": median(fresh_up), "fresh": fresh_up}


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
    """#5 baseline: boto3 ranged parallel download + torch.load (safetensors' ``load_file`` for
    a ``state.safetensors`` payload), in a fresh process."""
    import torch

    torch.set_num_threads(1)
    m = transfer_manager(p["part"], p["conc"])
    wd = workdir()
    rss0 = proc_status("VmRSS")
    t = now()
    dest = wd / Path(p["key"]).name
    m.download(p["bucket"], p["key"], str(dest)).result()
    if dest.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(dest)
        assert sd
    else:
        sd = torch.load(dest, map_location="cpu", weights_only=True)
        assert sd["model"]
    dt = now() - t
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
        with checkpointer({"booster": payload}, wd / "ckpt", f"s3://{bucket}/run/", framework="xgboost") as ck:
            it = ck.steps(total=reps + 5)
            for i in range(reps + 3):  # alternated, so both see the same machine
                next(it)
                payload[:8] = os.urandom(8)
                assert ck.flush()  # the Syncer idle (retention done) for both
                body = bytes(payload)
                t = now()
                c.put_object(Bucket=bucket, Key=f"raw/model-{i}.ubj", Body=body)
                base.append(now() - t)
                step = ck.step
                t = now()
                ck.save()
                if not ck.wait_durable(step, 60):
                    raise RuntimeError(f"step {step} not durable: {ck.last_error}")
                times.append(now() - t)
            it.close()
        times, base = times[3:], base[3:]
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    b, s = median(base), median(times)
    return {"base": b, "spotckpt": s, "ratio": s / b, "bytes": n, "times": times, "bases": base}


def _moto(path: str) -> str:
    with urllib.request.urlopen(urllib.request.Request(endpoint() + path, method="POST"), timeout=30) as r:
        return r.read().decode()


def case_idle(p: dict[str, Any]) -> dict[str, Any]:
    """#7 an idle Syncer over a local dir of ``files`` already-mirrored files: CPU and requests
    once the start-up (restore, first pass) is done, and the start-up's own apart."""
    files, seconds = p["files"], p["seconds"]
    wd, bucket = workdir(), new_bucket()
    local = wd / "ckpt"
    try:
        for i in range(files):
            rel = f"logs/d{i // 100:03d}/f{i % 100:03d}.txt"
            f = local / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"x" * 64)
        # As left by an earlier run that uploaded them all: one committed file set (untimed).
        from spotckpt._commit._local import LocalDir
        from spotckpt._remote._store import RemoteStore
        from spotckpt._watch._watcher import Watcher

        w = Watcher(LocalDir(local), RemoteStore(f"s3://{bucket}/run/"))
        while not w.run_pass():
            pass
        w.beat(clean=True)
        def record() -> int:
            _moto("/moto-api/recorder/stop-recording")
            rec = _moto("/moto-api/recorder/download-recording")
            _moto("/moto-api/recorder/reset-recording")
            _moto("/moto-api/recorder/start-recording")
            return len([x for x in rec.splitlines() if x.strip()])

        _moto("/moto-api/recorder/reset-recording")
        _moto("/moto-api/recorder/start-recording")
        c0, t0 = cpu_seconds(), now()
        with checkpointer({"x": 1}, local, f"s3://{bucket}/run/") as ck:
            # Idle is what follows the start-up: the restore of the script's files and the
            # Syncer's first pass over the dir (its listing of the committed set) come first,
            # reported apart; the window starts once that pass is done.
            syncer = ck._syncer
            while syncer._last_scan == float("-inf") or syncer._mirror_more:
                time.sleep(0.05)
            start_cpu, start_wall, start_requests = cpu_seconds() - c0, now() - t0, record()
            interval = syncer._idle_interval()
            # long enough for ``min_passes`` idle passes over the dir (whose interval stretches
            # with the dir's size), else ``seconds`` (quick mode: maybe no pass in the window)
            window = max(seconds, p.get("min_passes", 0) * interval + 1.0)
            c0, t0 = cpu_seconds(), now()
            time.sleep(window)
            cpu, wall = cpu_seconds() - c0, now() - t0
            requests = record()
            ck.save()  # leave cleanly
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    return {"cpu_percent": 100 * cpu / wall, "requests": requests, "files": files, "seconds": wall,
            "pass_interval": interval, "startup_seconds": start_wall, "startup_cpu": start_cpu,
            "startup_requests": start_requests}


from cases_cpu import case_savecpu  # noqa: E402,F401 - CPU-s per GiB vs the floor (bench/save_cpu.py)
from cases_watched import case_files_restore, case_watched  # noqa: E402,F401 - row 8, in its own module

CASES = {k[5:]: v for k, v in globals().items() if k.startswith("case_")}

if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    out = CASES[name](params)
    print("RESULT " + json.dumps(out), flush=True)
