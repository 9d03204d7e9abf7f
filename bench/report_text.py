"""The report's words: number formats, and why a row missed its target (from the numbers
of the run; used by ``run.py``)."""
from __future__ import annotations

from typing import Any

MiB, GiB = 1 << 20, 1 << 30


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.05 else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


def med(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def ms(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def sec(s: float) -> str:
    return f"{s:.2f} s"


def grace_table(pts: list[tuple[float, float]]) -> tuple[list[str], str]:
    """The largest state durable within 10/30/120 s of grace, from (bytes, seconds) points: a
    least-squares line, fixed cost + size / rate (through two points, the line through them;
    through the origin from the largest point if the fixed cost comes out < 0). Sizes past the
    largest point measured are marked extrapolated. Returns the table's rows and the model."""
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    fixed = my - slope * mx
    largest, at_largest = max(pts)
    if slope <= 0 or fixed < 0:
        slope, fixed = at_largest / largest, 0.0
    rows = []
    for grace in (10, 30, 120):
        size = max(0.0, (grace - fixed) / slope)
        beyond = f" (extrapolated: the largest measured is {human(largest)})" if size > largest else ""
        rows.append(f"| {grace} s | {human(size)}{beyond} |")
    how = "the line through" if n == 2 else "a least-squares line through"
    return rows, (f"Model: {fixed:.2f} s + size / ({human(1 / slope)}/s), {how} "
                  + ", ".join(f"{human(x)} in {y:.2f} s" for x, y in pts) + ".")


# Why a row misses and what would close the gap: filled in from what the measurements show
# (kept here so the next run's report carries them).
WHY: dict[str, str] = {}


def why(r: dict[str, Any], row: str) -> str:
    """Why a row missed and what would close the gap, from the numbers of this run."""
    load = r["load_before"][0]
    noisy = (f" The machine was shared (load average {load:.1f} on {len(r['cores'])} cores when the run "
             "started), which adds noise to every time here." if load > 1.0 else "")
    u, g, gs = r.get("upload", {}), r.get("sigterm", {}), r.get("sigterm_small", {})
    srv = {"rgw": "Ceph RGW"}.get(r.get("server", "moto"), r.get("server", "moto"))
    if row == "stall":
        s = r["stall"]
        return (f"the steady-state save copies {human(s['bytes'])} into reused buffers; the memcpy baseline took "
                f"{ms(s['memcpy'])} and the save {ms(s['stall'])} (runs: "
                + ", ".join(ms(x) for x in s["stalls"][1:]) + "): preemption by other processes on the client "
                "core shows up here first." + noisy)
    st = r.get("stall", {})
    serial = (f" (`torch.save` with fsync alone took {sec(st['torch_save'])} for {human(st['bytes'])}, the "
              "reference under row 1)" if "torch_save" in st else "")
    one_core = ("client has one core (the server has the other), so the writer and the upload (botocore's "
                "Python, CRC32, socket copies) take turns on it and on the GIL: streaming the payload while it is "
                "written overlaps the write's I/O, not its CPU")
    moto_fresh = (" On moto the server is a bottleneck too, slower right after the client wrote a fresh file: the "
                  "page cache the new file takes leaves moto colder memory for the object it builds (its CPU time for "
                  "the same upload grows by about half; measured with psutil in a side run)." if srv == "moto" else "")
    if row == "sigterm":
        small_ok = bool(gs) and gs["spotckpt"] <= gs["limit"]
        fresh = (f" Row 4r: the same raw upload of a file written just before (not timed) took "
                 f"{sec(g['upload_fresh'])} instead of {sec(g['upload'])}, and against it spotckpt's ratio is "
                 f"{g['spotckpt'] / (g['memcpy'] + g['upload_fresh']):.2f}×." if "upload_fresh" in g else "")
        return ("at the notice spotckpt serialises the state into a checkpoint file" + serial + " and uploads it "
                "as it is written; the baseline uploads a file that already exists, so no serialisation is in its "
                f"time. The {one_core}." + moto_fresh + fresh
                + (f" At {human(gs['bytes'])} the row meets its target ({sec(gs['spotckpt'])} against "
                   f"{sec(gs['limit'])})." if small_ok else "")
                + " What would close it: a spare client core (any training host has several), or uploading an "
                "interruption save straight from the snapshot without a local file (the local copy is worth little "
                "on a machine about to be reclaimed; a change to the commit protocol)." + noisy)
    if row == "upload":
        return (f"the writer (`torch.save`, XXH3, fsync) took {sec(u['write'] or 0)} for {human(u['bytes'])} with the "
                f"payload streaming up meanwhile" + serial + f", and {sec(u['upload_stage'] or 0)} of upload remained "
                f"after the local commit: the {one_core}, so the save's time is close to the write's plus the "
                "upload's." + moto_fresh
                + (f" The raw upload of a file written just before took {sec(u['base_fresh'])} (row 3r), and against "
                   f"that spotckpt's ratio is {u['base_fresh'] / u['spotckpt']:.2f}×." if "base_fresh" in u else "")
                + f" What would close it: a spare client core for the upload, or a server ({srv} here) not on the "
                "same VM." + noisy)
    if row == "restore":
        return ("the restore also checks the XXH3 checksum of every byte before loading, which the baseline "
                "does not, plus the Checkpointer's setup (probe write, listing, manifest)." + noisy)
    if row == "restore_rss":
        return ("the process holds the loaded tensors plus the libraries spotckpt imports (fsspec, s3fs, "
                "aiobotocore); a fixed ~50-90 MB that matters only for small states." + noisy)
    if row == "small":
        m = r["small"]
        return (f"one `put_object` of {human(m['bytes'])} took {ms(m['base'])}. A durable checkpoint is at least two "
                "requests one after the other, the payload PUT and then the manifest PUT (the commit protocol: the "
                "manifest goes last, once the payload is confirmed), plus pickling; the manifest PUT alone costs "
                "~2.5-4 ms here, so the protocol's floor is about 1.5-1.7× one PUT. Everything else is already off "
                "that path: the payload is streamed as soon as it is written, confirmed by the CRC32 the PUT echoes "
                "(no HEAD), the remote manifest does not wait for the local commit's fsyncs, and retention runs "
                "after. The rest is the client's single core: the writer's fsyncs and the Syncer's Python share it "
                "(and the GIL) with the PUT." + noisy)
    if row == "watched":
        w = r["watched"]
        return (f"per run (spotckpt / baseline): " + ", ".join(f"{sec(a)} / {sec(b)}" for a, b in
                                                             zip(w["times"], w["bases"]))
                + f". Of spotckpt's time, the set write took {ms(med(w['set_write']))} (median); the rest is "
                "the wait for the next scan (up to the scan interval, "
                f"{w['scan_interval']:g} s), the check that no process holds the file open for writing (a "
                "/proc scan, before the read and again after it), the writer gate (the supervisor's next poll, "
                "up to 0.1 s) and the upload itself, with the XXH3 checksum read in parallel on the same "
                "core. What would close it: being told of the close (inotify `IN_CLOSE_WRITE`) instead of "
                "scanning for it." + noisy)
    if row == "idle":
        i = r["idle"]
        return (f"{i['cpu_percent']:.2f}% of a core and {i['requests']} requests over {i['seconds']:.0f} s"
                + (f", a pass over the dir every {i['pass_interval']:.1f} s" if "pass_interval" in i else "")
                + "." + noisy)
    return ""


def why_slowdown(r: dict[str, Any]) -> str:
    d, di = r["slowdown"], r.get("slowdown_idle")
    per_s = d["cpu_per_gib"] * d["bytes"] / (1 << 30) / d["interval"]
    text = (f"the client has one core (the S3 server has the other) and the loop keeps it 100% busy, so every "
            f"CPU-second the background pipeline spends is taken from training. Measured: "
            f"{d['cpu_per_gib']:.2f} CPU-s per GiB saved ({d['cpu_per_save']:.2f} s per save), i.e. "
            f"{100 * per_s:.1f}% of a core at this cadence, for the snapshot memcpy, `torch.save` into the page "
            "cache (fresh pages are slow to touch on this VM), the XXH3 checksum (~0.04 s/GiB), the fsync, and the "
            "upload (reading the file back, botocore's CRC32, socket copies on loopback, botocore's Python per "
            "part). The target allows 0.35 CPU-s per save here, less than `torch.save` alone costs.")
    if di:
        text += (f" With the same saves and a step that leaves the CPU idle (row 2r, the GPU case) the slowdown is "
                 f"{100 * di['slowdown']:+.1f}%, mostly the GIL: the training thread waits for it while "
                 "background threads run Python code (botocore, the upload loop).")
    text += (" What would close the gap: a second client core (any real training host has several: the "
             "background work would not take the training thread's), and for the GIL share, uploads from a separate "
             "process (`spotckpt run` already does that).")
    return text
