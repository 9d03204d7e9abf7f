"""Remote -> local before a (re)start: the newest committed checkpoint plus the watched dir.

Sync layer: fsspec and the commit protocol only, no ML imports.

A new instance starts with an empty local dir; SageMaker copies the checkpoint prefix back
into ``/opt/ml/checkpoints`` before the training script runs. :func:`pull` does the same:
the newest committed checkpoint through :func:`restore_newest` (checksums verified,
damaged ones quarantined), then the newest committed file set of the watched dir
(``checkpoint.pth``, Transformers ``checkpoint-N/``...) through
:func:`spotckpt._watch._pull.restore_files`: verified, with mtimes and in-dir symlinks.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

from spotckpt._commit import LocalDir, Manifest, is_internal
from spotckpt._errors import CorruptCheckpointError, RemoteError, RemoteNotFoundError
from spotckpt._events import EventLog
from spotckpt._remote import RemoteStore
from spotckpt._watch import newest_set, restore_files

from ._progress import human_bytes
from ._restore import restore_newest


@dataclasses.dataclass
class PullResult:
    """What a pull brought (or found) locally."""

    step: int | None = None          # newest verified checkpoint, None if there is none
    step_bytes: int = 0
    step_source: str | None = None   # "local" or "remote"
    files: list[str] = dataclasses.field(default_factory=list)  # watched-dir files placed
    file_bytes: int = 0
    file_set: int | None = None      # the committed file set restored (its number)
    # the newest checkpoint, a torch.distributed one, not pulled (pull(ranked=False)): its
    # step, world_size and serializer
    ranked: dict | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        parts = []
        if self.step is not None:
            where = "already local" if self.step_source == "local" else "downloaded"
            parts.append(f"checkpoint step {self.step} ({human_bytes(self.step_bytes)}, {where}, verified)")
        elif self.step_source == "ranks":
            parts.append("a torch.distributed checkpoint (not pulled: each rank restores its own part)")
        else:
            parts.append("no committed checkpoint")
        parts.append(f"{len(self.files)} file(s) of the watched dir ({human_bytes(self.file_bytes)})")
        return ", ".join(parts) + f" in {self.seconds:.1f} s"


def local_freeform(root: Path) -> dict[str, int]:
    """Regular user files in the local dir (the watched dir's content): path -> size."""
    out: dict[str, int] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        dirnames[:] = [d for d in dirnames if not is_internal(f"{rel_dir}/{d}".lstrip("/"), root)]
        for name in filenames:
            rel = f"{rel_dir}/{name}".lstrip("/")
            full = os.path.join(dirpath, name)
            if not is_internal(rel, root) and not os.path.islink(full):
                try:
                    out[rel] = os.path.getsize(full)
                except FileNotFoundError:
                    pass
    return out


def remote_freeform(store: RemoteStore) -> dict[str, int]:
    """Files of the newest committed file set on the remote: path -> size."""
    fs = newest_set(store)
    return {} if fs is None else {p: e.size for p, e in fs.entries.items() if e.link is None}


class _Ranked(Exception):
    """The newest checkpoint is a torch.distributed one (see :func:`pull`'s ``ranked``)."""


def _refuse_ranked(m: Manifest) -> None:
    if m.files and all(f.path.startswith("rank-") for f in m.files):
        raise _Ranked(m)


def pull(local: LocalDir, store: RemoteStore, *, events: EventLog | None = None,
         on_total: Callable[[int], None] | None = None, ranked: bool = True) -> PullResult:
    """Bring the newest verified checkpoint and the newest committed file set into ``local``.

    Args:
        on_total: called once with the number of bytes this pull expects to download
            (for a progress bar).
        ranked: also a torch.distributed checkpoint (every rank's part). ``spotckpt run``
            says no: the ranks of its command restore their own parts, and a copy of all of
            them in its dir would cost the download and the disk ``world_size`` times.

    Raises:
        RemoteError, CorruptCheckpointError: as :func:`restore_newest`; a damaged file of
            the set is refused with an error line instead (see :mod:`spotckpt._watch._pull`).
    """
    events = events or EventLog(None)
    t0 = time.monotonic()
    events.emit("pull_start", remote=store.url)
    local.clean_temp()
    expect = 0
    if on_total is not None:
        steps = store.committed()
        if steps and steps[-1] not in local.committed():
            try:
                expect += store.read_manifest(steps[-1]).total_bytes
            except (RemoteError, CorruptCheckpointError):
                pass  # restore_newest reports it properly
    res = PullResult()
    local_before = set(local.committed())
    try:
        found = restore_newest(local, store, events=events, accept=None if ranked else _refuse_ranked)
    except _Ranked as e:
        found, m = None, e.args[0]
        res.step_source, res.ranked = "ranks", {"step": m.step, "world_size": m.world_size, "serializer": m.serializer}
        events.emit("pull_skipped", step=m.step, world_size=m.world_size,
                    reason="torch.distributed checkpoint: each rank restores its own part")
    if found is not None:
        res.step, manifest, _ = found
        res.step_bytes = manifest.total_bytes
        res.step_source = "local" if res.step in local_before else "remote"
    fs, res.files, res.file_bytes = restore_files(
        local, store, events=events,
        on_total=None if on_total is None else (lambda n: on_total(expect + n)))
    res.file_set = None if fs is None else fs.seq
    res.seconds = time.monotonic() - t0
    events.emit("pull", step=res.step, step_bytes=res.step_bytes, source=res.step_source,
                files=len(res.files), file_bytes=res.file_bytes, file_set=res.file_set,
                seconds=round(res.seconds, 3))
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
        quick = quick_store(url, storage_options)
        try:
            quick.committed()
        except RemoteError:
            # boto3's listing of a missing bucket fails (s3fs's was empty): name what is missing
            require_container(quick)
            raise
        require_container(quick)
    return RemoteStore(url, storage_options, attempts=attempts)


def require_container(store: RemoteStore) -> None:
    """A remote that does not exist is an error for commands that only read it, not an
    empty remote: the bucket of an ``s3://`` URL, the directory of a ``file://`` one (a
    remote written once, by a job or a push, has it; a missing one is a typo). A bucket that
    exists with nothing under the prefix is a valid empty remote. Other schemes: not checked.

    Raises:
        RemoteNotFoundError: naming the remote and what is missing.
    """
    if store.is_local:
        if os.path.isdir(store.root):
            return
        what = "is not a directory" if os.path.exists(store.root) else "does not exist"
        raise RemoteNotFoundError(f"spotckpt: remote {store.url}: the directory {store.root} {what} "
                                  "(nothing was ever written there; check --remote / SPOTCKPT_REMOTE)")
    if store.fast is None and "s3" not in str(store.fs.protocol):
        return
    bucket = store.root.split("/", 1)[0]

    def exists() -> bool:
        if store.fast is not None:
            try:
                store.fast.head_bucket()
            except FileNotFoundError:
                return False
            except PermissionError:
                return True  # it exists (the listing just worked); HEAD is not allowed
            return True
        return bool(store.fs.exists(bucket))
    if not store._call("bucket check", exists):
        raise RemoteNotFoundError(f"spotckpt: remote {store.url}: bucket '{bucket}' does not exist "
                                  "(check --remote / SPOTCKPT_REMOTE and the endpoint)")
