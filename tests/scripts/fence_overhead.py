"""What fencing adds per commit and at start, on the moto S3 server (issue 13, item 3).

    .venv/bin/python tests/scripts/fence_overhead.py [--commits 60] [--kb 64]

Commits tiny checkpoints through the Syncer, one after the other until durable, with and
without a generation (alternating runs, median per commit), and counts the S3 requests each
sends (botocore's ``before-send`` events on both clients).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import start_moto  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=60)
    ap.add_argument("--kb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    srv = start_moto()
    os.environ.update(srv.env())
    from spotckpt._sync._engine import Engine
    from spotckpt._remote._fence import claim
    from spotckpt._commit._local import LocalDir
    from spotckpt._commit._manifest import FileEntry, file_digest
    from spotckpt._remote._store import RemoteStore
    from spotckpt._sync._syncer import Syncer

    def one(fenced: bool, tmp: Path) -> tuple[float, float, int, int]:
        store = RemoteStore(f"s3://{srv.new_bucket()}/job/")
        sent = [0]

        def count(**kw: object) -> None:
            sent[0] += 1
        store.fast.client.meta.events.register("before-send", count)
        n0 = sent[0]
        t0 = time.perf_counter()
        fence = claim(store) if fenced else None
        start_ms, start_reqs = (time.perf_counter() - t0) * 1e3, sent[0] - n0
        local = LocalDir(tmp)
        local.root.mkdir(parents=True)
        syncer = Syncer(local, store, keep_last=2, mirror=False, fence=fence)
        syncer.start()
        engine = Engine(local, syncer=syncer, keep_last=2)
        data = os.urandom(args.kb << 10)

        def write(d: Path, ready: object) -> list:
            (d / "state.bin").write_bytes(data)
            return [FileEntry("state.bin", len(data), file_digest(d / "state.bin"))]
        times = []
        n0 = sent[0]
        for step in range(1, args.commits + 1):
            t = time.perf_counter()
            engine.commit(step, write, framework="bench", serializer="pickle")
            assert syncer.wait_durable(step, 60)
            times.append(time.perf_counter() - t)
            assert syncer.flush(60)  # retention done too, before the next commit
        reqs = sent[0] - n0
        syncer.close(10)
        return start_ms, statistics.median(times) * 1e3, start_reqs, reqs

    rows: dict[bool, list] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for fenced in (False, True):
                rows[fenced].append(one(fenced, Path(d) / f"{r}-{fenced}"))
    srv.stop()
    for fenced in (False, True):
        med = statistics.median(x[1] for x in rows[fenced])
        reqs = statistics.median(x[3] for x in rows[fenced]) / args.commits
        print(f"{'fenced' if fenced else 'unfenced'}: save-to-durable median {med:.1f} ms per commit, "
              f"{reqs:.2f} S3 requests (fast client) per commit; start (claim): "
              f"{statistics.median(x[0] for x in rows[fenced]):.1f} ms, "
              f"{statistics.median(x[2] for x in rows[fenced]):.0f} requests")


if __name__ == "__main__":
    main()
