"""CPU-seconds per GiB saved, before and after, against the floor, in one run (issue 25).

    python bench/save_cpu.py --server rgw --mib 256,1024 --reps 3 --before /tmp/base-tree

Starts the S3 server as ``bench/run.py`` does (RGW from tests/servers/, or moto), pins it to one
core and each case to the other, and runs ``bench/cases_cpu.py`` in a fresh process per size
and tree: this tree ("after") and, with ``--before``, another checkout of spotckpt whose
``bench/`` holds the same cases_cpu.py ("before"), alternated. Each case measures the floor
in its own process (see cases_cpu.py). Prints one table, and the JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import REPO, start_server


def run_case(tree: Path, env: dict, core: set[int], params: dict) -> dict:
    proc = subprocess.run([sys.executable, str(tree / "bench" / "cases.py"), "savecpu", json.dumps(params)],
                          env=dict(env, PYTHONPATH=str(tree)), capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, core), timeout=3600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case failed in {tree}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="moto", choices=["moto", "rgw"])
    ap.add_argument("--mib", default="256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--before", help="another spotckpt tree to measure first, for the 'before' column")
    ap.add_argument("--json")
    a = ap.parse_args()
    server = start_server(a.server)
    try:
        cores = sorted(os.sched_getaffinity(0))
        client_core, server_core = {cores[0]}, {cores[-1]}
        for pid in getattr(server, "pids", None) or ([server.proc.pid] if getattr(server, "proc", None) else []):
            os.sched_setaffinity(pid, server_core)
        env = dict(os.environ, **server.env(), BENCH_TMP=str(REPO / "bench" / "out"), PYTHONUNBUFFERED="1")
        env.pop("AWS_ENDPOINT_URL", None)
        (REPO / "bench" / "out").mkdir(exist_ok=True)
        rows = []
        for mib in [int(x) for x in a.mib.split(",")]:
            params = {"bytes": mib << 20, "reps": a.reps}
            trees = ([("before", Path(a.before))] if a.before else []) + [("after", REPO)]
            for label, tree in trees:
                r = run_case(tree, env, client_core, params)
                r.update(tree=label, mib=mib, server=a.server)
                rows.append(r)
                print(f"{a.server} {mib} MiB {label:6s} {r['serializer']:11s} CPU-s/GiB {r['cpu_per_gib']:.2f} "
                      f"(floor {r['floor_per_gib']:.2f}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["floor"].items()
                                                                         if k != "total") +
                      f") save->durable {r['save_wall']:.2f} s vs one PUT {r['put_wall']:.2f} s, load {r['load']:.2f}",
                      flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
