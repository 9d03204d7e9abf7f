"""What a start's generation claim costs after thousands of restarts, on the moto S3 server
(issue 26, item 7).

    .venv/bin/python tests/scripts/gen_starts.py [--starts 5000] [--window 20]

Claims a generation ``--starts`` times in a row on one remote prefix, as that many starts of
one job would, and prints the S3 requests (botocore's ``before-send`` events) and the
seconds of each claim, averaged over the first ``--window`` starts (around restart 10) and
the last (around restart N), the keys under ``gen/`` at the end, and one stale check's
requests. Every start gets a store of its own (its own Fence), sharing one boto3 client:
building a client costs the same at every start and is not what grows. With the code before
issue 26 (``PYTHONPATH`` at an older tree) the run stops at the first start that fails and
says which.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import start_moto  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=5000)
    ap.add_argument("--window", type=int, default=20)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # (stop the server on the way out)
    srv = start_moto()
    try:
        os.environ.update(srv.env())
        from spotckpt._errors import RemoteError
        from spotckpt._remote._fence import claim
        from spotckpt._remote._store import RemoteStore

        url = f"s3://{srv.new_bucket()}/job/"
        first = RemoteStore(url)
        sent = [0]
        first.fast.client.meta.events.register("before-send", lambda **kw: sent.__setitem__(0, sent[0] + 1))
        reqs: list[int] = []
        secs: list[float] = []
        fence = None
        t_all = time.perf_counter()
        for i in range(1, args.starts + 1):
            store = RemoteStore(url)
            store.fast = first.fast
            n0, t0 = sent[0], time.perf_counter()
            try:
                fence = claim(store)
            except RemoteError as e:
                print(f"start {i} failed: {e}")
                break
            secs.append(time.perf_counter() - t0)
            reqs.append(sent[0] - n0)
            if i % 500 == 0:
                print(f"  {i} starts, {time.perf_counter() - t_all:.0f} s", flush=True)
        keys = first.list_keys("gen/")
        n0 = sent[0]
        if fence is not None:
            fence.check("measurement")
        check = sent[0] - n0
        w, n = args.window, len(reqs)

        def window(a: int, b: int) -> str:
            return (f"starts {a + 1}-{b}: {statistics.mean(reqs[a:b]):.2f} requests, "
                    f"{statistics.median(secs[a:b]) * 1e3:.1f} ms median per start")
        marks = sorted({m for m in (1000, 2000, n) if w <= m <= n})
        print(f"[gen-starts] {n} starts on moto in {time.perf_counter() - t_all:.0f} s: {window(0, w)}; "
              + "; ".join(window(m - w, m) for m in marks)
              + f"; most requests in one start {max(reqs)}; keys under gen/ at the end: {len(keys)}; "
              f"a stale check: {check} request(s)")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
