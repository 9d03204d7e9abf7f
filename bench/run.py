"""Run every benchmark against the S3 test server on loopback and write BENCHMARKS.md.

    python bench/run.py            # full sizes (1 GiB states, the scale curve to 4 GiB), ~67 min on 2 cores (+ ~20: schedule)
    python bench/run.py --quick    # scaled-down sizes, 8.3 min on a quiet machine: the peers at 64 MiB (the
                                   # CPU-bound loop 1 round), the scale curve to 256 MiB, rows 2, 4, 6-8
    python bench/run.py --parts peers,scale --peer-sizes 1024   # one part alone
    python bench/run.py --parts idle                            # row 7 alone (on moto)
    python bench/run.py --from-json a.json b.json               # parts run apart, one report

The S3 server (Ceph RGW, brought up by the bench from tests/servers/; moto's when RGW cannot
start, said loudly; BENCH_SERVER=moto chooses moto) runs on one core and the benchmark client
on the other (``os.sched_setaffinity``), so neither steals the other's
CPU. Each case runs in a fresh client process (the peers' cases forked from a warm parent per
contender, bench/zygote.py) and measures its baseline in that same process; the report gives
every ratio, never a bare time alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from common import ServerUnavailable, start_server  # noqa: E402 - the one place the server is chosen
from peer_bench import run_peers, run_scale  # noqa: E402
from peer_report import peer_sections  # noqa: E402
from report_base import base_report  # noqa: E402
from report_text import GiB, MiB  # noqa: E402
from zygote import Zygote  # noqa: E402

FULL = dict(big=GiB, small_big=256 * MiB, slow_bytes=512 * MiB, slow_interval=10.0, slow_seconds=60.0,
            slow_pairs=3, reps=3, stall_reps=5, small=MiB, small_reps=30, files=10_000, idle_seconds=60.0, idle_passes=2,
            sweep=[[8, 8], [16, 8], [32, 4], [64, 4]], sweep_reps=2)
QUICK = dict(big=256 * MiB, small_big=64 * MiB, slow_bytes=128 * MiB, slow_interval=2.5, slow_seconds=8.0,
             slow_pairs=2, reps=2, stall_reps=4, small=MiB, small_reps=15, files=2_000, idle_seconds=10.0, idle_passes=0,
             sweep=[[16, 8], [32, 4]], sweep_reps=1)


# The peers (bench/peers.py): state sizes with their targets, rounds, the loop's cadence.
FULL.update(peer_sizes=[64 * MiB, GiB], peer_rounds=3, peer_loop={"steps": 300, "interval": 2.0, "pairs": 2,
                                                                   "seconds": 0},
            loop_rounds=3, moto_rounds=3, scale=[64 * MiB, 256 * MiB, GiB, 4 * GiB], scale_names=["spotckpt", "sagemaker", "dcp_local"])
QUICK.update(peer_sizes=[64 * MiB], peer_rounds=2, peer_loop={"steps": 200, "interval": 2.0, "pairs": 1,
                                                               "seconds": 0},
             loop_rounds=1, moto_rounds=1, scale=[64 * MiB, 256 * MiB], scale_names=["spotckpt", "sagemaker", "dcp_local"])


def choose_server(kind: str | None = None) -> Any:
    """RGW (the real S3 server) unless BENCH_SERVER says otherwise; when it cannot start,
    say so loudly and fall back to moto."""
    kind = kind or os.environ.get("BENCH_SERVER", "rgw")
    try:
        return start_server(kind)
    except ServerUnavailable as e:
        print("=" * 78 + f"\n!!! BENCH: {e}\n!!! BENCH: running against moto ONLY: the rows measure the mock, "
              "not a real S3 server\n" + "=" * 78, flush=True)
        server = start_server("moto")
        server.fallback = str(e)
        return server


class Bench:
    def __init__(self, quick: bool, server: Any = None, zygotes: dict[str, Zygote] | None = None) -> None:
        self.quick = quick
        self.p = QUICK if quick else FULL
        self.cores = sorted(os.sched_getaffinity(0))
        self.client_cores = {self.cores[0]}
        self.server_cores = {self.cores[1]} if len(self.cores) > 1 else {self.cores[0]}
        self.tmp = REPO / "bench" / "out"
        self.tmp.mkdir(parents=True, exist_ok=True)
        os.environ["MOTO_RECORDER_FILEPATH"] = str(self.tmp / "moto_recording.jsonl")
        self.server = server or choose_server()
        for pid in getattr(self.server, "pids", None) or ([self.server.proc.pid] if self.server.proc else []):
            os.sched_setaffinity(pid, self.server_cores)
        self.env = dict(os.environ, **self.server.env())
        self.env.pop("AWS_ENDPOINT_URL", None)
        self.env.pop("AWS_PROFILE", None)
        self.env["BENCH_TMP"] = str(self.tmp)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.pop("SPOTCKPT_REMOTE", None)
        self.env.pop("SPOTCKPT_LOCAL_DIR", None)
        # the peers' cases fork from a warm parent per contender (bench/zygote.py), shared
        # with the moto column's Bench (``zygotes``)
        self.own_zygotes = zygotes is None
        self.zygotes: dict[str, Zygote] = zygotes if zygotes is not None else {}

    def close(self) -> None:
        for z in self.zygotes.values() if self.own_zygotes else ():
            z.close()
        self.server.stop()

    def case(self, case_name: str, script: str = "cases.py", **params: Any) -> dict[str, Any]:
        """One case in a fresh client process, ``python bench/SCRIPT NAME '<json>'``; a peer's
        case (``peer_cases.py``) forked from its contender's warm parent (``bench/zygote.py``:
        the imports before the clock paid once, not once per case)."""
        name = case_name
        t = time.monotonic()
        cores = self.client_cores
        if script == "peer_cases.py":
            z = self.zygotes.get(params["name"])
            if z is None:
                z = self.zygotes[params["name"]] = Zygote("peer_cases", params["name"], self.env,
                                                          lambda: os.sched_setaffinity(0, cores), self.tmp)
            rc, stdout = z.run(name, params, self.env)
            stderr = ""
        else:
            proc = subprocess.run([sys.executable, str(REPO / "bench" / script), name, json.dumps(params)],
                                  env=self.env, capture_output=True, text=True,
                                  preexec_fn=lambda: os.sched_setaffinity(0, cores))
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if rc != 0 or not lines:
            raise RuntimeError(f"bench case {name} failed ({rc}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
        out = json.loads(lines[-1][7:])
        print(f"  {name}: {time.monotonic() - t:.0f} s  {json.dumps(out)[:300]}", flush=True)
        return out

    def bucket(self) -> str:
        return self.server.new_bucket()

    def empty(self, bucket: str, prefix: str = "") -> None:
        c = self.server.client()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        for up in c.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
            c.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])

    def drop(self, bucket: str) -> None:
        self.empty(bucket)
        self.server.client().delete_bucket(Bucket=bucket)


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` once. On a VM the first touch of a guest page is several
    times slower than any later one (measured: a fresh 1 GiB memcpy 3.9 s, the next 0.1 s);
    without this the first case would measure the hypervisor, not the code."""
    import numpy as np

    a = np.ones(nbytes, dtype=np.uint8)
    del a


PARTS = ("base", "peers", "loop", "scale", "schedule")


def run_schedule(quick: bool) -> dict[str, Any]:
    """every="auto" against fixed intervals: the emulator on file:// (no S3 server needed)."""
    import schedule

    return schedule.run(REPO / "bench" / "out" / "schedule", quick=quick, log=lambda m: print(m, flush=True))


def run(quick: bool, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    if set(parts) == {"schedule"}:  # alone: no S3 server, no memory warm-up
        t0 = time.monotonic()
        return {"quick": quick, "parts": ["schedule"], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "load_before": os.getloadavg(), "schedule": run_schedule(quick), "elapsed": time.monotonic() - t0,
                "load_after": os.getloadavg()}
    b = Bench(quick)
    p = b.p
    res: dict[str, Any] = {"quick": quick, "params": p, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           "load_before": os.getloadavg(), "cores": b.cores, "parts": list(parts),
                           "server": b.server.name, "server_fallback": getattr(b.server, "fallback", None),
                           "client_cores": sorted(b.client_cores), "server_cores": sorted(b.server_cores)}
    t0 = time.monotonic()
    try:
        print("warming memory", flush=True)
        warm_memory(6 * p["big"] if not quick else 4 * GiB)
        if "peers" in parts or "scale" in parts or "loop" in parts:
            run_peer_parts(b, res, parts)
        res["elapsed_peers"] = time.monotonic() - t0
        if "base" in parts:
            run_base(b, res)
        elif "idle" in parts:  # row 7 alone
            res["idle"] = run_idle(b)
    finally:
        b.close()
    if "schedule" in parts:
        res["schedule"] = run_schedule(quick)
    res["elapsed"] = time.monotonic() - t0
    res["load_after"] = os.getloadavg()
    return res


def run_peer_parts(b: Bench, res: dict[str, Any], parts: tuple[str, ...]) -> None:
    """The peers at each size of ``peer_sizes`` (the CPU-bound loop at the smallest), on the
    bench's server and, when that is RGW, at the smallest size on moto too (the second
    column); then the scale curve at the sizes the peers did not already measure."""
    p = b.p
    small = min(p["peer_sizes"])
    if "peers" in parts:
        print(f"peers on {b.server.name}:", flush=True)
        res["peers"] = [run_peers(b, size, p["peer_rounds"], reps=2 if size <= 256 * MiB else 1)
                        for size in p["peer_sizes"]]
        if b.server.name != "moto":
            print("peers on moto (second column):", flush=True)
            mb = Bench(b.quick, server=start_server("moto"), zygotes=b.zygotes)
            try:
                res["peers_moto"] = run_peers(mb, min(small, 64 * MiB), p["moto_rounds"], reps=2)
            finally:
                mb.close()
    if "loop" in parts:  # every contender runs the same steps, alone and saving, alternated
        print("peers in the CPU-bound loop:", flush=True)
        res["peer_loop"] = run_peers(b, small, p["loop_rounds"] or 1, reps=0, loop=p["peer_loop"], loop_only=True)
    if "scale" in parts:
        done = {r["bytes"] for r in res.get("peers", [])}
        print("scale curve:", flush=True)
        res["scale"] = run_scale(b, [s for s in p["scale"] if s not in done], p["scale_names"])


def run_base(b: Bench, res: dict[str, Any]) -> None:
    """spotckpt against raw transfers (rows 1-8)."""
    p = b.p
    print("benchmarks:", flush=True)
    if not b.quick:  # QUICK=1: the peer rows measure stall, save -> durable and restore
        res["stall"] = b.case("stall", bytes=p["big"], reps=p["stall_reps"])
        res["upload"] = b.case("upload", bytes=p["big"], reps=p["reps"], sweep=p["sweep"], sweep_reps=p["sweep_reps"])
    part, conc = (int(x) for x in res["upload"]["best"].split("x")) if "upload" in res else (16, 8)
    res["sigterm"] = b.case("sigterm", bytes=p["big"], reps=p["reps"], part=part, conc=conc)
    if not b.quick:
        res["sigterm_small"] = b.case("sigterm", bytes=p["small_big"], reps=2, part=part, conc=conc)
        run_restore(b, res, part)
    run_rest(b, res)


def run_restore(b: Bench, res: dict[str, Any], part: int) -> None:
    p = b.p
    bucket = b.bucket()
    remote = f"s3://{bucket}/run/"
    b.case("restore_setup", bytes=p["big"], remote=remote)
    key = next(o["Key"] for o in b.server.client().list_objects_v2(Bucket=bucket)["Contents"]
               if o["Key"].endswith("state.pt"))
    # The raw download's best range size (moto copies the whole object for every ranged
    # GET, so fewer, bigger ranges win there), then alternate baseline and spotckpt.
    sweep = {}
    for dpart in sorted({part, 64, max(16, p["big"] // MiB // 8)}):
        sweep[f"{dpart}x8"] = b.case("restore_base", bucket=bucket, key=key, part=dpart, conc=8)
    dbest = min(sweep, key=lambda k: sweep[k]["seconds"])
    rb, rs = [sweep[dbest]], []
    for i in range(p["reps"]):
        if i:
            rb.append(b.case("restore_base", bucket=bucket, key=key, part=int(dbest.split("x")[0]), conc=8))
        rs.append(b.case("restore_spot", remote=remote))
    b.drop(bucket)
    res["restore"] = {"base": rb, "spot": rs, "bytes": p["big"], "best": dbest,
                      "sweep": {k: v["seconds"] for k, v in sweep.items()}}


def run_idle(b: Bench) -> dict[str, Any]:
    """Row 7, on moto (its recorder counts the requests): the bench's server if that is moto."""
    p = b.p
    if b.server.name == "moto":
        return b.case("idle", files=p["files"], seconds=p["idle_seconds"], min_passes=p["idle_passes"])
    mb = Bench(b.quick, server=start_server("moto"))
    try:
        return run_idle(mb)
    finally:
        mb.close()


def run_rest(b: Bench, res: dict[str, Any]) -> None:
    p = b.p
    res["small"] = b.case("small", bytes=p["small"], reps=p["small_reps"])
    res["idle"] = run_idle(b)
    res["watched"] = b.case("watched", bytes=p["big"], reps=p["reps"])
    res["slowdown"] = b.case("slowdown", bytes=p["slow_bytes"], interval=p["slow_interval"],
                             seconds=p["slow_seconds"], pairs=p["slow_pairs"])
    if not b.quick:
        res["slowdown_idle"] = b.case("slowdown", bytes=p["slow_bytes"], interval=p["slow_interval"],
                                      seconds=p["slow_seconds"], pairs=p["slow_pairs"], work="idle")


# -- the report ---------------------------------------------------------------------------
def server_line(r: dict[str, Any]) -> str:
    if r.get("server") == "rgw":
        return ("The S3 server is Ceph's RADOS Gateway (one monitor, one OSD, radosgw on 127.0.0.1, brought up by "
                "the bench with `tests/servers/`), a production S3 implementation; moto's server is the second "
                "column where shown.")
    fb = r.get("server_fallback")
    return ("The S3 server is moto's (a Python mock)" + (f": **RGW could not be started ({fb}), so every row here "
                                                         "measures moto**" if fb else "") + ".")


def report(r: dict[str, Any], out: Path, raw: str | None = None) -> str:
    """The report to write at ``out``; its plot beside it (bench/scale.svg for BENCHMARKS.md)."""
    cmd = "make bench QUICK=1" if r["quick"] else "make bench"
    parts = r.get("parts", list(PARTS))
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{cmd}` ({'quick mode: scaled-down sizes' if r['quick'] else 'full sizes'}"
        + ("" if set(parts) == set(PARTS) else f"; parts {', '.join(parts)}") + f") on "
        f"{r['started']}; {len(r['cores'])} cores ({platform.processor() or platform.machine()}), "
        f"load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f} "
        f"(the machine is shared with other developers' test runs); {r['elapsed'] / 60:.1f} min"
        + (f" (peers and scale curve {r['elapsed_peers'] / 60:.1f} min)" if "elapsed_peers" in r else "") + ". "
        + server_line(r),
    ]
    if r.get("merged"):
        lines += ["", "Parts run separately and rendered together with `bench/run.py --from-json` (the header "
                  "above is the first run's); ratios are always within one run: "
                  + "; ".join(r["merged"]) + "."]
    lines += base_report(r) if "slowdown" in r else []
    default = out.resolve() == (REPO / "BENCHMARKS.md").resolve()
    svg = REPO / "bench" / "scale.svg" if default else out.with_name(out.stem + "-scale.svg")
    lines += peer_sections(r, svg, os.path.relpath(svg, out.resolve().parent))
    if r.get("schedule"):
        from schedule_report import report_lines
        lines += report_lines(r["schedule"], out)
    if raw is not None:
        lines += ["", "## Raw results", "", f"Every figure above, in full: [`{raw}`]({raw}) (re-render this "
                  f"report with `python bench/run.py --from-json {raw}`).", ""]
    return "\n".join(lines)


# What describes a run rather than measures: the merged report's header keeps the first run's.
META = {"quick", "params", "started", "load_before", "load_after", "cores", "server", "server_fallback",
        "client_cores", "server_cores", "elapsed_peers"}


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of parts run separately, as one: the first run's header (date, load, server),
    later runs' results winning, except the peers' sizes (all kept, one per size); the parts
    united and the times summed."""
    r: dict[str, Any] = {}
    peers: dict[int, Any] = {}
    for i, x in enumerate(runs):
        for res in x.get("peers", []):
            peers[res["bytes"]] = res
        parts = sorted(set(r.get("parts", [])) | set(x.get("parts", [])))
        elapsed = r.get("elapsed", 0.0) + x.get("elapsed", 0.0)
        r.update(x if i == 0 else {k: v for k, v in x.items() if k not in META})
        r["parts"], r["elapsed"] = parts, elapsed
    r["peers"] = [peers[k] for k in sorted(peers)]
    # (a merged file re-rendered alone keeps the runs it was merged from)
    r["merged"] = [m for x in runs for m in x.get("merged") or [
        f"{x.get('started')} ({', '.join(x.get('parts', []))}, {'quick' if x.get('quick') else 'full'}, "
        f"load {x['load_before'][0]:.1f}-{x['load_after'][0]:.1f})"]]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=os.environ.get("QUICK") not in (None, "", "0"))
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="which parts to run: base (rows 1-8), peers, loop, scale, schedule (default: all); idle: "
                         "row 7 alone")
    ap.add_argument("--peer-sizes", help="the peers' state sizes in MiB, comma-separated (default: 64,1024; "
                    "quick: 64)")
    ap.add_argument("--loop-rounds", type=int, help="rounds that also run the CPU-bound loop (default: all; quick: 0)")
    ap.add_argument("--from-json", nargs="+", help="only re-render the report from saved results files "
                    "(several: parts run separately, merged in order)")
    a = ap.parse_args()
    if a.from_json:
        runs = [json.loads(Path(f).read_text()) for f in a.from_json]
        r = merge(runs) if len(runs) > 1 else runs[0]  # (one run re-rendered is not a merge)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the servers are stopped on the way out
        parts = tuple(x for x in a.parts.split(",") if x)
        if a.loop_rounds is not None:
            (QUICK if a.quick else FULL)["loop_rounds"] = a.loop_rounds
        if a.peer_sizes:
            (QUICK if a.quick else FULL)["peer_sizes"] = [int(x) * MiB for x in a.peer_sizes.split(",")]
        r = run(a.quick, parts)
        (REPO / "bench" / "out").mkdir(exist_ok=True)
        name = "results.json" if set(parts) == set(PARTS) else f"results-{'-'.join(parts)}.json"
        (REPO / "bench" / "out" / name).write_text(json.dumps(r, indent=1))
    out = Path(a.out)
    if r.get("parts") == ["schedule"] and out.exists():
        from schedule_report import write_alone  # its own section only: the rest of the report stays
        print(f"wrote the schedule section of {a.out} and {write_alone(r, out, a.from_json)}")
        return
    # the raw results, in full, beside the report: bench/results.json for BENCHMARKS.md
    raw = REPO / "bench" / "results.json" if out.resolve() == (REPO / "BENCHMARKS.md").resolve() \
        else out.with_suffix(".json")
    if not (a.from_json and [str(Path(f).resolve()) for f in a.from_json] == [str(raw.resolve())]):
        raw.write_text(json.dumps(r, indent=1, default=str) + "\n")
    rel = os.path.relpath(raw, out.resolve().parent)
    out.write_text(report(r, out, rel))
    print(f"wrote {a.out} and {raw}")


if __name__ == "__main__":
    main()
