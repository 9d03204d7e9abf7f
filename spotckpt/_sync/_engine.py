"""The checkpoint engine: local commit with retention, and verified restore.

Restore takes the newest committed checkpoint over local and remote, downloads what is
missing, verifies sizes and checksums, quarantines a bad one and falls back to the next
older one. Nothing unverified is ever returned.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable

from spotckpt._commit import (
    MANIFEST,
    FileEntry,
    LocalDir,
    Manifest,
    build_manifest,
    check_relpath,
    owned_step_dir,
    step_dirname,
    verify_dir,
)
from spotckpt._errors import ConfigError, CorruptCheckpointError, LocalDirError, SpotckptError
from spotckpt._events import EventLog, log
from spotckpt._remote import RemoteStore, generation_of, order, payload_dir

from ._syncer import Syncer


class Engine:
    """Commits checkpoints into a :class:`LocalDir` and hands them to a :class:`Syncer`.

    Example:
        >>> eng = Engine(LocalDir(root), syncer=None, keep_last=2)  # doctest: +SKIP
        >>> eng.commit(100, lambda tmp, ready: [write_payload(tmp)], framework="torch", serializer="torch")
    """

    def __init__(self, local: LocalDir, *, syncer: Syncer | None, keep_last: int,
                 events: EventLog | None = None, rank: int = 0, world_size: int = 1,
                 local_retention: bool = True) -> None:
        self.local, self.syncer, self.keep_last = local, syncer, keep_last
        # Off under `spotckpt run`: the supervisor uploads from this dir in another process
        # and applies local retention itself, after its uploads.
        self.local_retention = local_retention
        # Set by the owner when the Syncer calls retention() after every upload.
        self.retention_after_upload = False
        self.events = events or EventLog(None)
        self.rank, self.world_size = rank, world_size
        self.generation = 0  # this job's generation on the remote, recorded in manifests
        self._retention_lock = threading.Lock()

    def commit(self, step: int, write: Callable[[Path, Callable[[str, int], None]], Iterable[FileEntry]], *,
               framework: str, serializer: str, extra: dict | None = None,
               stream: Iterable[str] = ()) -> Path:
        """Write a checkpoint with ``write(tmpdir, ready)`` (which returns the file entries of
        fsynced files), commit it locally, apply retention and queue the upload.

        Args:
            write: writes the payload into ``tmpdir``; it may call ``ready(name, size)`` as
                soon as a streamed file is complete (before its fsync and checksum), so its
                upload finishes sooner.
            stream: names of files ``write`` produces strictly front to back (never seeking
                back); with an idle ``s3://`` Syncer they are uploaded while being written.
        """
        if self.local.is_committed(step):
            return self.local.path(step)
        tmp = self.local.begin(step)
        ups = self._start_streams(step, tmp, stream)

        def ready(name: str, size: int) -> None:
            if name in ups:
                ups[name].finish(size)
        try:
            entries = list(write(tmp, ready))
            sizes = {e.path: e.size for e in entries}
            for name, up in ups.items():
                if name in sizes:
                    up.finish(sizes[name])  # a different size than ready() said aborts it
                else:
                    up.abort()
            if self.generation:
                extra = {**(extra or {}), "generation": self.generation}
            manifest = build_manifest(step, entries, framework=framework, serializer=serializer,
                                      rank=self.rank, world_size=self.world_size, extra=extra)
            if ups and set(ups) == set(sizes) and self.syncer is not None:
                # Everything is being streamed: the remote commit need not wait for the
                # local one (its fsyncs); the Syncer writes the remote manifest as soon as the
                # streams confirm these files.
                self.syncer.submit(step, manifest=manifest, streamed={n: tmp / n for n in ups})
            path = self.local.commit(tmp, manifest)
        except BaseException as e:
            for up in ups.values():
                up.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            os_err = _disk_error(e)
            if os_err is not None:
                raise _write_error(self.local, step, os_err) from e
            raise
        self.events.emit("commit", step=step, bytes=manifest.total_bytes)
        if self.syncer is not None:
            self.syncer.submit(step)
        s = self.syncer
        if not (self.retention_after_upload and s is not None and s.last_error is None) \
                or (s.durable_step is not None and s.durable_step >= step):
            # (Otherwise a healthy Syncer applies retention after this step's upload, off
            # the path from save to durable: bench/ row 6. A step the Syncer committed
            # remotely before this local commit had its upload's retention run without it:
            # none follows, so it runs here; it used to leave one checkpoint too many.)
            self.retention()
        return path

    def _start_streams(self, step: int, tmp: Path, names: Iterable[str]) -> dict:
        """Upload-while-writing for ``names`` when the Syncer will take this step next (it
        is idle) and the remote has a fast path; otherwise the Syncer uploads after commit."""
        syncer = self.syncer
        store = getattr(syncer, "store", None)
        names = list(names)
        if not names or store is None or getattr(store, "fast", None) is None or syncer.busy_steps():
            return {}
        layout = getattr(syncer, "layout", None)
        marker: str | None = layout.marker_key(step) if layout is not None else f"{step_dirname(step)}/{MANIFEST}"
        if store.known_absent(marker):
            # No manifest of this step can be there (the remote was listed at start and
            # every manifest since is ours): no need to look before streaming. (A rank's
            # part marker may be left by an earlier run, so ranks always look.)
            marker = None
        ups = {}
        for name in names:
            rel = layout.payload_key(step, name) if layout is not None else f"{step_dirname(step)}/{name}"
            up = store.stream_file(tmp / name, rel, unless=marker,
                                   committed=self.local.path(step) / name)
            if up is not None:
                ups[name] = up
        return ups

    def retention(self) -> None:
        """Keep the ``keep_last`` newest local checkpoints; never delete the newest one or
        one that is queued or uploading."""
        if not self.local_retention:
            return
        with self._retention_lock:  # the writer thread after a commit, the Syncer after an upload
            steps = self.local.committed()
            busy = self.syncer.busy_steps() if self.syncer is not None else set()
            keep = set(steps[-self.keep_last:]) | busy
            for s in steps[:-1]:
                if s not in keep:
                    self.local.delete(s)
                    self.events.emit("local_deleted", step=s)


def _disk_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: ``e`` itself, or (torch.save reports a full disk
    as ``RuntimeError: unexpected pos``) a disk error in its chain."""
    if isinstance(e, OSError):
        return None if isinstance(e, SpotckptError) else e
    for _ in range(8):
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
        if e is None:
            break
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
            return e
    return None


def _write_error(local: LocalDir, step: int, e: OSError) -> LocalDirError:
    """A failed local save (full disk, quota, I/O error) as one line that says what is safe.

    The policy is to stop: training on without being able to save would turn the next
    interruption into lost work. The step's partial files are gone; older checkpoints are
    untouched.
    """
    final = local.path(step)
    if final.exists() and not (final / MANIFEST).exists() and owned_step_dir(final):
        shutil.rmtree(final, ignore_errors=True)  # renamed into place, manifest write failed
    prev = [s for s in local.committed() if s < step]
    kept = f"checkpoint step {prev[-1]} is intact" if prev else "no earlier checkpoint exists"
    err = LocalDirError(
        f"spotckpt: cannot write checkpoint step {step} to local_dir '{local.root}': "
        f"{e.strerror or e}; {kept}. Free space there or use a bigger local_dir "
        "(SPOTCKPT_LOCAL_DIR), then restart to resume")
    err.errno = e.errno
    return err


def _download(store: RemoteStore, local: LocalDir, step: int, manifest: Manifest,
              prefix: str | None = None) -> Path:
    free = shutil.disk_usage(local.root).free
    if manifest.total_bytes > free:
        raise LocalDirError(
            f"spotckpt: restoring step {step} needs {manifest.total_bytes} bytes but "
            f"local_dir '{local.root}' has {free} free; free space or use a bigger local_dir")
    tmp = local.begin(step)
    base = tmp.resolve()
    d = payload_dir(step, generation_of(manifest)) if prefix is None else prefix
    try:
        for e in manifest.files:
            target = (tmp / check_relpath(e.path)).resolve()
            if base not in target.parents:
                raise CorruptCheckpointError(f"spotckpt: manifest path {e.path!r} escapes the checkpoint dir")
            key = f"{d}/{e.path}"
            if store.is_local and os.path.islink(store.path(key)):
                raise CorruptCheckpointError(f"spotckpt: remote {key} is a symlink; refusing it")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                # Compare sizes before downloading: an object larger than its manifest says
                # (hostile or damaged) must not fill the disk.
                remote_size = store.size(key)
                if remote_size != e.size:
                    raise CorruptCheckpointError(
                        f"spotckpt: remote {key} has {remote_size} bytes, its manifest says {e.size}")
                store.get_file(key, target, size=remote_size)
            except FileNotFoundError as err:  # the bucket is there: we just read the manifest
                raise CorruptCheckpointError(
                    f"spotckpt: remote {key} is named by its manifest but missing") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def restore_newest(local: LocalDir, store: RemoteStore | None, *, events: EventLog | None = None,
                   accept: Callable[[Manifest], None] | None = None) -> tuple[int, Manifest, bool] | None:
    """Find, fetch and verify the newest committed checkpoint.

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
    # over the newest one's (_fence.py). Remote manifests are read once here.
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
    for step in candidates:
        if step in local_steps:
            try:
                m = local.read_manifest(step)
                verify_dir(local.path(step), m)
                events.emit("restore", step=step, source="local")
                return step, m, step in remote_steps
            except CorruptCheckpointError as e:
                log.warning("%s; quarantined, trying an older checkpoint", e)
                events.emit("quarantine", step=step, where="local", error=str(e))
                local.quarantine(step)
        if store is not None and step in remote_steps:
            tmp: Path | None = None
            try:
                m = read.pop(step, None) or store.read_manifest(step)
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
            return step, m, True
    return None


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
            if sorted(m.files) == sorted(want.files):
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
