"""Reading the watched dir's remote state (issue 11) for the end-to-end tests, in one place.

Remote layout (docs/design.md, "The watched dir"): under the remote prefix,
``files/SET-<12-digit seq>.json`` are file-set manifests (the highest readable one is the
dir's remote state), ``{"format": "spotckpt-files/1", "seq": N, "created": T, "entries": [...]}``
with entries ``{"path", "size", "xxh3", "mtime_ns", "key"}`` for files and
``{"path", "link", "mtime_ns"}`` for symlinks; ``files/<vid>/...`` hold the versions.
A format change is a fix here only.
"""
from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import xxhash

from proc_helpers import PY

SET_RX = re.compile(r"^files/SET-(\d{12})\.json$")


@functools.lru_cache(maxsize=None)
def _store(url: str):
    """One store per URL: a RemoteStore makes its own S3 client, which costs ~0.3 s."""
    from spotckpt._remote._store import RemoteStore

    return RemoteStore(url)


def remote_set_seqs(url: str) -> list[int]:
    """The sequence numbers of every file-set manifest under the prefix, ascending."""
    keys = _store(url).find("files")
    return sorted(int(m.group(1)) for k in keys if (m := SET_RX.match(k)))


def remote_set_doc(url: str) -> dict | None:
    """The newest file-set manifest that parses (None if there is none). A set deleted
    between the listing and the read (a running writer replaced it) means: list again."""
    from spotckpt._errors import RemoteNotFoundError

    store = _store(url)
    for _ in range(10):
        seqs = remote_set_seqs(url)
        if not seqs:
            return None
        for seq in reversed(seqs):
            try:
                doc = json.loads(store.cat(f"files/SET-{seq:012d}.json"))
            except RemoteNotFoundError:
                break  # superseded meanwhile: list again
            except ValueError:
                continue
            assert doc.get("format") == "spotckpt-files/1" and doc.get("seq") == seq, doc
            return doc
        else:
            return None
    raise AssertionError(f"{url}: the newest file set kept vanishing while read")


def remote_set(url: str) -> dict[str, dict]:
    """The remote state of the watched dir: path -> entry of the newest set ({} if none)."""
    doc = remote_set_doc(url)
    return {e["path"]: e for e in doc["entries"]} if doc else {}


def is_link(entry: dict) -> bool:
    return "link" in entry


def fetch(url: str, entry: dict) -> bytes:
    """The bytes of one file entry, checked against the set's size and XXH3."""
    body = _store(url).cat(entry["key"])
    assert len(body) == entry["size"], f"{entry['path']}: {len(body)} bytes, set says {entry['size']}"
    want = entry["xxh3"].lower()
    got = (xxhash.xxh3_128_hexdigest(body) if len(want) == 32 else xxhash.xxh3_64_hexdigest(body))
    assert got == want, f"{entry['path']}: XXH3 {got}, set says {want}"
    return body


def dir_units(entries: dict[str, dict], prefix: str = "checkpoint-") -> dict[str, set[str]]:
    """Top-level dirs named ``prefix*`` -> the names of the files the set lists in each."""
    out: dict[str, set[str]] = {}
    for p in entries:
        top, _, rest = p.partition("/")
        if top.startswith(prefix) and rest:
            out.setdefault(top, set()).add(rest)
    return out


# -- process trees and the supervisor --------------------------------------------------------
def run_argv(local: Path, remote: str, *cmd: str, grace: float = 20) -> list[str]:
    """``spotckpt run`` as a user types it (no tuning flags)."""
    return [PY, "-m", "spotckpt", "run", "--local-dir", str(local), "--remote", remote,
            "--grace", str(grace), "--", *cmd]


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_tree(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant at once, as when the machine goes away, and
    wait until none of them runs any more (a zombie does nothing; orphans wait for PID 1,
    which reaps them only about once a second here)."""
    procs = tree(proc.pid)
    signal_tree(procs, signal.SIGKILL)
    proc.wait(30)
    end = time.monotonic() + 30
    for p in procs:
        while True:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            assert time.monotonic() < end, f"pid {p.pid} still runs 30 s after SIGKILL"
            time.sleep(0.005)


def script(name: str) -> str:
    return str(Path(__file__).resolve().parent / "scripts" / name)


__all__ = ["remote_set", "remote_set_doc", "remote_set_seqs", "fetch", "dir_units", "is_link",
           "run_argv", "kill_tree", "signal_tree", "tree", "script"]
