"""Writes a self-checking checkpoint.pth in place, as many scripts do, for the watched-dir
tests: ``<8-byte counter><body><16-byte XXH3 of counter+body>``.

    python inplace_writer.py DIR TRIGGER    # version 1; then, once TRIGGER exists, half of
                                            # version 2 over it, then hang (to be killed)
"""
import os
import sys
import time

import xxhash

d, trigger = sys.argv[1], sys.argv[2]
path = os.path.join(d, "checkpoint.pth")
SIZE = 256 << 10


def version(i: int) -> bytes:
    body = i.to_bytes(8, "big") + bytes([i % 251]) * SIZE
    return body + xxhash.xxh3_128(body).digest()


start = 1
if os.path.exists(path):
    with open(path, "rb") as f:
        start = int.from_bytes(f.read(8), "big") + 1
with open(path, "wb") as f:
    f.write(version(start))
print(f"pid {os.getpid()} saved version {start}", flush=True)
while not os.path.exists(trigger):
    time.sleep(0.02)
data = version(start + 1)
with open(path, "r+b") as f:       # in place, same size: a torn file looks complete by size
    f.write(data[: len(data) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(3600)
