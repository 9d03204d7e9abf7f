"""The checkpoint engine's save side: local commit with retention, handing commits to the Syncer.

A save is written into a hidden temp dir, committed locally (manifest last), queued for
upload (streamed while being written when the Syncer is idle), and the local retention
keeps the ``keep_last`` newest. A failed write (full disk) is one line saying what is safe.
Restore is in :mod:`._restore`.
"""
from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from spotckpt._commit import MANIFEST, FileEntry, LocalDir, build_manifest, owned_step_dir, step_dirname
from spotckpt._errors import LocalDirError, SpotckptError
from spotckpt._events import EventLog

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
                upload finishes sooner; and ``ready(name, size, buffers)`` before writing a
                file whose bytes are all in memory: the upload then sends them from there,
                beside the local write (it returns None, or a ``release()`` to call once the
                file is complete and before the buffers change).
            stream: names of files ``write`` produces strictly front to back (never seeking
                back); with an idle ``s3://`` Syncer they are uploaded while being written.
        """
        if self.local.is_committed(step):
            return self.local.path(step)
        tmp = self.local.begin(step)
        ups = self._start_streams(step, tmp, stream)

        def ready(name: str, size: int, memory: Any = None) -> Callable[[], None] | None:
            # (with ``memory``, the file's bytes before it is written: the stream sends
            # them from there; the writer calls the returned ``release`` before it returns)
            if name in ups:
                if memory is not None:
                    return ups[name].feed(memory, size)
                ups[name].finish(size)
            return None
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
