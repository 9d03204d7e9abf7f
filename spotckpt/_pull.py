"""Remote -> local before a (re)start: the newest committed checkpoint plus free-form files.

Sync layer: fsspec and the commit protocol only, no ML imports.

A new instance starts with an empty local dir; SageMaker copies the checkpoint prefix back
into ``/opt/ml/checkpoints`` before the training script runs. :func:`pull` does the same:
the newest committed checkpoint through :func:`restore_newest` (checksums verified,
damaged ones quarantined), then every free-form file (``checkpoint.pth``, Keras
``epoch-003.keras``...) that the local dir lacks. A local free-form file is never
overwritten: it is as new as the remote copy or newer, and the Syncer uploads it.
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from ._engine import restore_newest
from ._errors import CorruptCheckpointError, RemoteError
from ._events import EventLog
from ._local import TMP_SUFFIX, LocalDir, is_internal
from ._manifest import MANIFEST, check_relpath, parse_step_dirname
from ._store import RemoteStore


@dataclasses.dataclass
class PullResult:
    """What a pull brought (or found) locally."""

    step: int | None = None          # newest verified checkpoint, None if there is none
    step_bytes: int = 0
    step_source: str | None = None   # "local" or "remote"
    files: list[str] = dataclasses.field(default_factory=list)  # free-form files downloaded
    file_bytes: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        parts = []
        if self.step is not None:
            where = "already local" if self.step_source == "local" else "downloaded"
            parts.append(f"checkpoint step {self.step} ({human_bytes(self.step_bytes)}, {where}, verified)")
        else:
            parts.append("no committed checkpoint")
        parts.append(f"{len(self.files)} free-form file(s) ({human_bytes(self.file_bytes)})")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def is_freeform(rel: str, root: Path | None = None) -> bool:
    """True for user files (mirrored as they are), False for checkpoints and our own files
    (``rel`` in the local dir ``root``, or a remote key without it: see :func:`is_internal`)."""
    return bool(rel) and not is_internal(rel, root) and not rel.endswith(MANIFEST + ".quarantined")


def remote_freeform(store: RemoteStore) -> dict[str, int]:
    """Free-form files on the remote: relative path -> size."""
    return {rel: size for rel, size in store.find().items() if is_freeform(rel)}


def local_freeform(root: Path) -> dict[str, int]:
    """Free-form files in the local dir: relative path -> size."""
    out: dict[str, int] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        # (a user dir named step-N is not mirrored either: see Syncer._user_files)
        dirnames[:] = [d for d in dirnames if not is_internal(f"{rel_dir}/{d}".lstrip("/"), root)
                       and (rel_dir or parse_step_dirname(d) is None)]
        for name in filenames:
            rel = f"{rel_dir}/{name}".lstrip("/")
            full = os.path.join(dirpath, name)
            if is_freeform(rel, root) and not os.path.islink(full):
                try:
                    out[rel] = os.path.getsize(full)
                except FileNotFoundError:
                    pass
    return out


def pull_files(local: LocalDir, store: RemoteStore, *, events: EventLog | None = None,
               on_pulled: Callable[[str, Path], None] | None = None,
               remote_files: dict[str, int] | None = None) -> tuple[list[str], int]:
    """Download the free-form files the local dir lacks, each verified by size.

    Args:
        on_pulled: called with ``(rel, path)`` for each file written (the Syncer records
            it as mirrored, so it is not uploaded back).

    Returns:
        ``(paths, bytes)`` of the files downloaded.

    Raises:
        RemoteError: a download failed after retries.
        CorruptCheckpointError: a downloaded file has the wrong size, or the remote holds
            a path that would escape the local dir.
    """
    events = events or EventLog(None)
    root = local.root.resolve()
    have = local_freeform(local.root)
    got: list[str] = []
    total = 0
    files = remote_freeform(store) if remote_files is None else remote_files
    for rel, size in sorted(files.items()):
        if rel in have:
            continue
        target = (root / check_relpath(rel)).resolve()
        if root not in target.parents:
            raise CorruptCheckpointError(f"spotckpt: remote path {rel!r} escapes the local dir; refusing it")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        try:
            store.get_file(rel, tmp)
            if tmp.stat().st_size != size:
                raise CorruptCheckpointError(
                    f"spotckpt: downloaded {rel} has {tmp.stat().st_size} bytes, the remote lists {size}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        got.append(rel)
        total += size
        events.emit("pull_file", path=rel, bytes=size)
        if on_pulled is not None:
            on_pulled(rel, target)
    return got, total


def pull(local: LocalDir, store: RemoteStore, *, events: EventLog | None = None,
         on_pulled: Callable[[str, Path], None] | None = None,
         on_total: Callable[[int], None] | None = None) -> PullResult:
    """Bring the newest verified checkpoint and the missing free-form files into ``local``.

    Args:
        on_total: called once with the number of bytes this pull expects to download
            (for a progress bar).

    Raises:
        RemoteError, CorruptCheckpointError: as :func:`pull_files` and :func:`restore_newest`.
    """
    events = events or EventLog(None)
    t0 = time.monotonic()
    local.clean_temp()
    files = remote_freeform(store)
    if on_total is not None:
        have = local_freeform(local.root)
        expect = sum(s for r, s in files.items() if r not in have)
        steps = store.committed()
        if steps and steps[-1] not in local.committed():
            try:
                expect += store.read_manifest(steps[-1]).total_bytes
            except (RemoteError, CorruptCheckpointError):
                pass  # restore_newest reports it properly
        on_total(expect)
    res = PullResult()
    local_before = set(local.committed())
    found = restore_newest(local, store, events=events)
    if found is not None:
        res.step, manifest, _ = found
        res.step_bytes = manifest.total_bytes
        res.step_source = "local" if res.step in local_before else "remote"
    res.files, res.file_bytes = pull_files(local, store, events=events, on_pulled=on_pulled, remote_files=files)
    res.seconds = time.monotonic() - t0
    events.emit("pull", step=res.step, step_bytes=res.step_bytes, source=res.step_source,
                files=len(res.files), file_bytes=res.file_bytes, seconds=round(res.seconds, 3))
    return res



def quick_store(url: str, storage_options: dict | None = None) -> RemoteStore:
    """A :class:`RemoteStore` with few retries and a short connect timeout, for checks
    that must fail within seconds (a wrong endpoint, bucket or credentials)."""
    quick = dict(storage_options or {})
    if url.lower().startswith("s3://"):
        ck = dict(quick.get("config_kwargs") or {})
        ck.setdefault("retries", {"max_attempts": 2})
        ck.setdefault("connect_timeout", 5)
        quick["config_kwargs"] = ck
    return RemoteStore(url, quick, attempts=2, base_delay=0.2)


def open_remote(url: str, storage_options: dict | None = None, *, probe: str | None = "write",
                attempts: int = 6) -> RemoteStore:
    """A :class:`RemoteStore` for ``url``, checked up front by a quick probe.

    Args:
        probe: ``"write"`` (write and delete a small object: for commands that upload),
            ``"read"`` (list the checkpoints: for read-only commands), or None.

    Raises:
        RemoteError: the remote cannot be reached (or written).
    """
    if probe == "write":
        quick_store(url, storage_options).probe()
    elif probe == "read":
        quick_store(url, storage_options).committed()
    return RemoteStore(url, storage_options, attempts=attempts)
