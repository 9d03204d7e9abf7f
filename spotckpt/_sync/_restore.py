"""Verified restore: the newest committed checkpoint, or one rank's part of it.

Restore takes the newest committed checkpoint over local and remote, downloads what is
missing, verifies sizes and checksums, quarantines a bad one and falls back to the next
older one. Nothing unverified is ever returned, and a local checkpoint older than the
remote's newest never wins over it (:mod:`._stale`).
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from spotckpt._commit import LocalDir, Manifest, check_relpath, step_dirname, verify_dir
from spotckpt._errors import ConfigError, CorruptCheckpointError, LocalDirError, RemoteError
from spotckpt._events import EventLog, log
from spotckpt._remote import RemoteStore, generation_of, order, payload_dir

from ._stale import same_checkpoint, superseded


def _download(store: RemoteStore, local: LocalDir, step: int, manifest: Manifest,
              prefix: str | None = None) -> Path:
    d = payload_dir(step, generation_of(manifest)) if prefix is None else prefix
    # Every object's real size against its manifest first (a HEAD each, which the download
    # then reuses), then the free space: a manifest that lies about a size (damaged or
    # hostile) is a damaged checkpoint, quarantined so that restore falls back, never a
    # "free space" error that stops every start; and an object larger than its manifest
    # says must not fill the disk.
    keys = []
    for e in manifest.files:
        key = f"{d}/{check_relpath(e.path)}"  # (CorruptCheckpointError: a path that escapes)
        if store.is_local and os.path.islink(store.path(key)):
            raise CorruptCheckpointError(f"spotckpt: remote {key} is a symlink; refusing it")
        try:
            remote_size = store.size(key)
        except FileNotFoundError as err:  # the bucket is there: we just read the manifest
            raise CorruptCheckpointError(
                f"spotckpt: remote {key} is named by its manifest but missing") from err
        if remote_size != e.size:
            raise CorruptCheckpointError(
                f"spotckpt: remote {key} has {remote_size} bytes, its manifest says {e.size}")
        keys.append(key)
    free = shutil.disk_usage(local.root).free
    if manifest.total_bytes > free:
        raise LocalDirError(
            f"spotckpt: restoring step {step} needs {manifest.total_bytes} bytes but "
            f"local_dir '{local.root}' has {free} free; free space or use a bigger local_dir")
    tmp = local.begin(step)
    base = tmp.resolve()
    try:
        for e, key in zip(manifest.files, keys):
            target = (tmp / check_relpath(e.path)).resolve()
            if base not in target.parents:
                raise CorruptCheckpointError(f"spotckpt: manifest path {e.path!r} escapes the checkpoint dir")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.get_file(key, target, size=e.size)
            except FileNotFoundError as err:  # deleted since its size was read
                raise CorruptCheckpointError(
                    f"spotckpt: remote {key} is named by its manifest but missing") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def restore_newest(local: LocalDir, store: RemoteStore | None, *, events: EventLog | None = None,
                   accept: Callable[[Manifest], None] | None = None) -> tuple[int, Manifest, bool] | None:
    """Find, fetch and verify the newest committed checkpoint.

    A local checkpoint that the remote's newest supersedes (:func:`._stale.superseded`: this
    dir sat out while another instance took the job further) is set aside in the state dir's
    ``quarantine/`` and the remote's is restored; so are local checkpoints above the one
    restored that ranked below it (an older generation's, never durable).

    Args:
        accept: called with a remote manifest before its files are fetched; raises to stop
            (a checkpoint of another world size).

    Returns:
        ``(step, manifest, durable)`` with the checkpoint verified in ``local.path(step)``,
        ``durable`` telling whether the remote has it; or None when nothing valid exists.
    """
    events = events or EventLog(None)
    local_steps = set(local.committed())
    remote_steps = set(store.committed()) if store is not None else set()
    # Newest generation first, then newest step: a stale instance's late commit never wins
    # over the newest one's (_remote/_fence.py). Remote manifests are read once here.
    read: dict[int, Manifest] = {}
    gens: dict[int, float] = {}  # remote step -> generation (inf: unreadable, tried first)

    def manifest_of(s: int) -> Manifest:
        if s not in read:
            gens[s] = float("inf")
            read[s] = store.read_manifest(s) if s in remote_steps else local.read_manifest(s)
            gens[s] = generation_of(read[s])
        return read[s]
    ranked = order(store, remote_steps, manifest_of) if store is not None else []
    top = max((g for g in gens.values() if g != float("inf")), default=0)

    def local_gen(s: int) -> float:  # a local-only checkpoint: its own record, else the newest
        try:
            return generation_of(manifest_of(s)) or top
        except (CorruptCheckpointError, OSError):
            return float("inf")
    gens = {s: g for s, g in gens.items() if s in remote_steps}
    if gens:  # generations were read: they order the steps that order() looked at
        keyed = [((gens[s], s), s) for s in ranked if s in gens]
        keyed += [((local_gen(s), s), s) for s in local_steps - remote_steps]
        candidates = [s for _, s in sorted(keyed, reverse=True)] + [s for s in ranked if s not in gens]
    else:
        candidates = sorted(local_steps | remote_steps, reverse=True)
    theirs_of: dict[int, Manifest | None] = {}

    def remote(s: int) -> Manifest | None:  # remote step s's manifest (None: unreadable)
        if s not in theirs_of:
            try:
                theirs_of[s] = read[s] if s in read else store.read_manifest(s)  # (read[s]: remote's)
            except (CorruptCheckpointError, RemoteError):
                theirs_of[s] = None
        return theirs_of[s]

    def newer_remote(step: int, m: Manifest) -> Manifest | None:
        """The remote checkpoint that supersedes local ``m`` (a dir that sat out), or None."""
        if store is None:
            return None
        if step in remote_steps:
            theirs = remote(step)
        else:
            theirs = next((t for t in map(remote, (c for c in candidates if c in remote_steps)) if t), None)
        return theirs if theirs is not None and superseded(m, theirs) else None
    for step in candidates:
        if step in local_steps:
            try:
                m = local.read_manifest(step)
                verify_dir(local.path(step), m)
                theirs = newer_remote(step, m)
                if theirs is None:
                    events.emit("restore", step=step, source="local")
                    _older_aside(local, step, events)
                    durable = step in remote_steps and (remote(step) is None or same_checkpoint(m, remote(step)))
                    return step, m, durable
                _stale_aside(local, step, theirs, events)
            except CorruptCheckpointError as e:
                log.warning("%s; quarantined, trying an older checkpoint", e)
                events.emit("quarantine", step=step, where="local", error=str(e))
                local.quarantine(step)
        if store is not None and step in remote_steps:
            tmp: Path | None = None
            try:
                m = theirs_of.get(step) or read.pop(step, None) or store.read_manifest(step)
                if accept is not None:
                    accept(m)
                tmp = _download(store, local, step, m)
                verify_dir(tmp, m)
            except CorruptCheckpointError as e:
                log.warning("%s (remote %s); quarantined, trying an older checkpoint", e, step_dirname(step))
                events.emit("quarantine", step=step, where="remote", error=str(e))
                if tmp is not None:
                    local.set_aside(tmp, f"remote-{step_dirname(step)}-{os.getpid()}")
                store.quarantine(step)
                continue
            except BaseException:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            local.commit(tmp, m)
            events.emit("restore", step=step, source="remote", bytes=m.total_bytes)
            _older_aside(local, step, events)
            return step, m, True
    return None


def _stale_aside(local: LocalDir, step: int, theirs: Manifest, events: EventLog) -> None:
    """Set local checkpoint ``step`` aside (kept in the state dir's ``quarantine/``): the
    remote's ``theirs`` supersedes it (:func:`._stale.superseded`)."""
    dest = local.set_aside(local.path(step), f"stale-{step_dirname(step)}-{int(time.time())}-{uuid.uuid4().hex[:6]}")
    log.warning("spotckpt: local checkpoint step %d is older than the remote's step %d (this dir sat out while "
                "the job went on elsewhere); the remote's wins, the local one is kept at %s", step, theirs.step, dest)
    events.emit("stale_local", step=step, remote_step=theirs.step, to=str(dest))


def _older_aside(local: LocalDir, restored: int, events: EventLog) -> None:
    """Local checkpoints above the one restored ranked below it (an older generation's, never
    durable): a dir that sat out. Set aside, so that nothing uploads them and a commit of
    their step number is not taken for done."""
    for s in local.committed():
        if s > restored:
            dest = local.set_aside(local.path(s), f"stale-{step_dirname(s)}-{int(time.time())}-{uuid.uuid4().hex[:6]}")
            log.warning("spotckpt: local checkpoint step %d is from an older generation of the job than step %d "
                        "restored; kept at %s", s, restored, dest)
            events.emit("stale_local", step=s, remote_step=restored, to=str(dest))


def fetch_all(local: LocalDir, store: RemoteStore, step: int, manifest: Manifest, *,
              events: EventLog | None = None, rank: int = 0) -> Path:
    """Every rank's part of the committed multi-rank checkpoint ``step`` (its combined
    ``manifest``), downloaded and verified into a temp dir of ``local`` that the caller
    removes: what DCP reads to reshard.

    Raises:
        CorruptCheckpointError: a file is missing or damaged.
    """
    tmp = _download(store, local, step, manifest)
    try:
        verify_dir(tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (events or EventLog(None)).emit("restore", step=step, source="remote", rank=rank,
                                    bytes=manifest.total_bytes, parts=manifest.world_size)
    return tmp


def restore_part(local: LocalDir, store: RemoteStore, step: int, rank: int, world_size: int, *,
                 events: EventLog | None = None) -> Manifest:
    """Make this rank's part of the committed multi-rank checkpoint ``step`` present and
    verified in ``local.path(step)`` (downloading it when the local copy is missing or bad).

    Raises:
        CorruptCheckpointError: the checkpoint is damaged or was written by another world size.
    """
    from spotckpt._commit import rank_dirname

    from ._layout import part_of

    events = events or EventLog(None)
    combined = store.read_manifest(step)
    if combined.world_size != world_size:
        raise ConfigError(
            f"spotckpt: step {step} was written by {combined.world_size} ranks and this job has "
            f"{world_size}; resume with the same world size")
    want = part_of(combined, rank)
    if step in local.committed():
        try:
            m = local.read_manifest(step)
            if set(m.files) == set(want.files):
                verify_dir(local.path(step), m)
                events.emit("restore", step=step, source="local", rank=rank)
                return m
        except CorruptCheckpointError as e:
            events.emit("quarantine", step=step, where="local", error=str(e))
        local.quarantine(step)
    tmp = _download(store, local, step, want,
                    prefix=f"{payload_dir(step, generation_of(combined))}/{rank_dirname(rank)}")
    try:
        verify_dir(tmp, want)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    local.commit(tmp, want)
    events.emit("restore", step=step, source="remote", rank=rank, bytes=want.total_bytes)
    return want
