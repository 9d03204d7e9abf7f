"""A script that rewrites its checkpoint files IN PLACE (``open(path, "r+b")``, same size every
time) at random moments, for the watched-dir chaos test (issue 11, finding 1).

Each file is self-validating: a 52-byte header (magic, file id, counter, body length,
SHA-256 of the body) and a body that is a pure function of (file id, counter). The header is
written first, then the body in chunks, so a copy read during a rewrite, or a mix of two
versions, fails validation. No torch: it starts in a fraction of a second.

On start it reads every file: a valid one gives its counter, a missing one starts at 0, an
invalid one is reported (``INVALID <path> <why>``) and restarted at 0. Prints
``start <path>=<counter> ...`` then runs until killed (or ``--seconds``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import struct
import sys
import time

MAGIC = b"WCHK"
HEADER = struct.Struct("<4sIQI32s")  # magic, file id, counter, body length, sha256(body)
# path, body bytes, seconds between rewrites (lo, hi), pause after each 64 KiB chunk, pause
# after the header (a writer that opened the file and stalls: its mtime does not move meanwhile)
FILES = [
    ("fast.bin", 48 * 1024, (0.3, 0.3), 0.0, 0.0),
    ("small.bin", 4 * 1024, (0.05, 0.5), 0.0, 0.0),
    ("sub/mid.bin", 192 * 1024, (0.2, 1.0), 0.001, 0.0),
    ("big.bin", 768 * 1024, (0.3, 1.5), 0.002, 0.0),
    ("stall.bin", 64 * 1024, (0.2, 0.8), 0.0, 0.05),
]


def body(fid: int, counter: int, n: int) -> bytes:
    return random.Random(fid * 1_000_003 + counter).randbytes(n)


def encode(fid: int, counter: int, n: int) -> tuple[bytes, bytes]:
    b = body(fid, counter, n)
    return HEADER.pack(MAGIC, fid, counter, n, hashlib.sha256(b).digest()), b


def validate(data: bytes, fid: int | None = None, n: int | None = None) -> int:
    """The counter of a valid file's bytes; raises ValueError on anything else."""
    if len(data) < HEADER.size:
        raise ValueError(f"short: {len(data)} bytes")
    magic, f, counter, size, digest = HEADER.unpack_from(data)
    b = data[HEADER.size:]
    if magic != MAGIC:
        raise ValueError("bad magic")
    if (fid is not None and f != fid) or (n is not None and size != n) or len(b) != size:
        raise ValueError(f"wrong id/size: id {f} size {size} len {len(b)}")
    if hashlib.sha256(b).digest() != digest:
        raise ValueError(f"body does not match the header of version {counter} (torn or mixed)")
    if b != body(f, counter, size):
        raise ValueError(f"body is not version {counter}")
    return counter


def rewrite(path: str, fid: int, counter: int, n: int, pause: float, stall: float) -> None:
    head, b = encode(fid, counter, n)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:  # the first version
            f.write(head + b)
        return
    with open(path, "r+b") as f:  # in place, same size
        f.write(head)
        if stall:
            f.flush()
            time.sleep(stall)
        for i in range(0, n, 64 * 1024):
            f.write(b[i:i + 64 * 1024])
            if pause:
                f.flush()
                time.sleep(pause)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--seconds", type=float, default=3600.0)
    args = ap.parse_args()
    rng = random.Random()
    counters = {}
    for fid, (rel, n, *_) in enumerate(FILES):
        p = os.path.join(args.dir, rel)
        counters[rel] = 0
        if os.path.exists(p):
            try:
                with open(p, "rb") as f:
                    counters[rel] = validate(f.read(), fid, n)
            except ValueError as e:
                print(f"INVALID {rel} {e}", flush=True)
    print("start " + " ".join(f"{k}={v}" for k, v in counters.items()), flush=True)
    now = time.monotonic()
    due = {rel: now + rng.uniform(0, lo + hi) / 2 for rel, _, (lo, hi), *_ in FILES}
    end = now + args.seconds
    while time.monotonic() < end:
        rel = min(due, key=due.get)
        time.sleep(max(0.0, due[rel] - time.monotonic()))
        fid = next(i for i, f in enumerate(FILES) if f[0] == rel)
        _, n, (lo, hi), pause, stall = FILES[fid]
        counters[rel] += 1
        rewrite(os.path.join(args.dir, rel), fid, counters[rel], n, pause, stall)
        print(f"wrote {rel} {counters[rel]}", flush=True)
        due[rel] = time.monotonic() + rng.uniform(lo, hi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
