"""The watched dir, remote -> local: restore the newest committed file set.

Sync layer (no ML imports). Every file is downloaded to a temp name beside its place
(fixed length: any legal name can be restored), verified (size, XXH3-128) and given the
mtime it had when it was mirrored; only once every file of the set is downloaded are they
renamed into place, so a restore that has to start over (the job committed a newer set
and deleted this one's objects meanwhile) never leaves a mix of two sets. A directory
checkpoint is placed only when all its files verified; a file or unit that cannot be
downloaded or written here is refused with one error line, the rest is restored. Symlinks
are recreated when they point inside the dir, lexically and, once all are placed, as
resolved (one that does not is refused or removed with a warning: never followed). Files
already present with the committed size and mtime are kept.

A local file that differs from the set is kept as newer (the watcher uploads it) unless it
may be torn: held back by the last supervisor, or modified after the last heartbeat of the
watcher that was running here minus one interval (that watcher was killed; see
:class:`._watcher.Watcher.beat`), or it is older than the committed version (its mtime is
before the committed one's: the dir sat out while another instance took the job further).
Such a file is moved to the state dir's ``suspect/`` (``stale/`` for an older one) and the
committed version takes its place.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from spotckpt._commit import TMP_SUFFIX, LocalDir, file_digest, hasher, is_internal
from spotckpt._errors import CorruptCheckpointError, RemoteError, RemoteNotFoundError
from spotckpt._events import EventLog, log
from spotckpt._remote import RemoteStore

from ._baseline import older
from ._closed import suspect_test
from ._fileset import FILES, Entry, FileSet, hand_over, listing_of, newest_set, quarantiner, warn_foreign
from ._scan import link_inside

_PARALLEL = 8  # files downloaded at once (8 boto3 threads: 1,000 small files in 6.3 s, one at a time 32 s)
_SMALL = 8 << 20  # files up to this size are one GET, verified in memory
_RESTARTS = 5  # the set being restored was superseded: start over with the newer one, this often


def _inside(root: Path, target: Path) -> bool:
    """True if ``target``'s parent resolves inside ``root`` (no symlinked dir escapes)."""
    try:
        parent = target.parent.resolve()
    except OSError:
        return False
    return parent == root or root in parent.parents


class _Superseded(Exception):
    """An object of the set being restored is gone because a newer set replaced it."""

    def __init__(self, newer: FileSet) -> None:
        super().__init__(newer.seq)
        self.newer = newer


Pending = list[tuple[Path, Path, Entry]]  # (temp, target, entry) of one unit, verified


class _Restore:
    def __init__(self, local: LocalDir, store: RemoteStore, events: EventLog) -> None:
        self.local, self.store, self.events = local, store, events
        self.root = local.root.resolve()
        self.suspect = suspect_test(local.meta)
        self.got: list[str] = []
        self.bytes = 0
        self.skipped: list[str] = []
        try:
            self.name_max = os.pathconf(self.root, "PC_NAME_MAX")
        except (OSError, ValueError):
            self.name_max = 255

    def set_aside(self, rel: str, *, stale: bool = False) -> None:
        """Move local file ``rel`` into the state dir: ``suspect/`` (may be torn) or, with
        ``stale``, ``stale/`` (older than its committed version)."""
        where = "stale" if stale else "suspect"
        dest = self.local.meta / where / f"{int(time.time())}-{uuid.uuid4().hex[:6]}" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.root / rel), dest)
        if stale:
            log.warning("spotckpt: %s here is older than its committed version (this dir sat out while the "
                        "job went on elsewhere); the committed version replaces it, the local one is kept "
                        "at %s", rel, dest)
        else:
            log.warning("spotckpt: %s may be torn (it was being written when the last run was killed); "
                        "the committed version replaces it, the local one is kept at %s", rel, dest)
        self.events.emit("file_set_aside", path=rel, to=str(dest), reason=where)

    def refuse(self, name: str, err: object) -> None:
        self.skipped.append(name)
        log.error("spotckpt: not restoring %s: %s", name, err)
        self.events.emit("pull_file_refused", path=name, error=str(err))

    def wanted(self, e: Entry) -> bool:
        """Whether ``e`` must be downloaded (False: the local copy stays)."""
        p = self.root / e.path
        try:
            st = os.stat(p, follow_symlinks=False)
        except FileNotFoundError:
            return True
        except NotADirectoryError:
            return False
        import stat as _st
        if _st.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
            return False
        if _st.S_ISREG(st.st_mode) and self.suspect(e.path, st):
            self.set_aside(e.path)
            return True
        if _st.S_ISREG(st.st_mode) and older(st, e):
            self.set_aside(e.path, stale=True)
            return True
        return False  # newer locally: the watcher uploads it

    @staticmethod
    def drop(pending: Pending, made: list[Path]) -> None:
        """Remove temp files and the dirs made for them; never raises."""
        for tmp, _, _ in pending:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass

    def prepare_unit(self, name: str, entries: list[Entry], made: list[Path]) -> Pending | None:
        """The temp names of the wanted files of one unit, their dirs created (added to
        ``made``); nothing downloaded yet. None: refused (a name this file system cannot
        hold, a path outside the dir, a dir that cannot be made)."""
        pending: Pending = []
        try:
            for e in [e for e in entries if self.wanted(e)]:
                target = self.root / e.path
                if any(len(part.encode()) > self.name_max for part in e.path.split("/")):
                    raise CorruptCheckpointError(f"spotckpt: {e.path!r}: a name is longer than this "
                                                 f"file system allows ({self.name_max} bytes)")
                if not _inside(self.root, target):
                    raise CorruptCheckpointError(f"spotckpt: {e.path!r} would be written outside {self.root}")
                made += [d for d in reversed([target.parent, *target.parent.parents]) if d not in made
                         and (d == self.root or self.root in d.parents) and not d.exists()]
                target.parent.mkdir(parents=True, exist_ok=True)
                pending.append((target.parent / f".spotckpt-{uuid.uuid4().hex[:16]}{TMP_SUFFIX}", target, e))
        except (CorruptCheckpointError, OSError) as err:  # OSError: a dir cannot be made here
            self.refuse(name, err)
            return None
        return pending

    def fetch(self, e: Entry, tmp: Path) -> None:
        """Download one file to ``tmp``, verified (size, XXH3), with its committed mtime. A
        small one is one GET, hashed from memory; a big one is told its size (no HEAD)."""
        if e.size <= _SMALL:
            data = self.store.cat(e.key)
            if len(data) != e.size:
                raise CorruptCheckpointError(f"spotckpt: {e.path}: downloaded {len(data)} bytes, the set says {e.size}")
            h = hasher()
            h.update(data)
            if h.hexdigest() != e.xxh3:
                raise CorruptCheckpointError(f"spotckpt: {e.path} fails its checksum")
            with open(tmp, "xb") as f:
                f.write(data)
        else:
            self.store.get_file(e.key, tmp, size=e.size)
            size = tmp.stat().st_size
            if size != e.size:
                raise CorruptCheckpointError(f"spotckpt: {e.path}: downloaded {size} bytes, the set says {e.size}")
            if file_digest(tmp) != e.xxh3:
                raise CorruptCheckpointError(f"spotckpt: {e.path} fails its checksum")
        os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))

    def download_unit(self, fs: FileSet, name: str, pending: Pending) -> Pending:
        """Download and verify one unit's files to their temp names (``[]``: refused, its
        temp files removed).

        Raises:
            _Superseded: an object is gone and a newer set exists.
            RemoteError: a download failed after retries.
        """
        try:
            for tmp, _, e in pending:
                self.fetch(e, tmp)
        except RemoteNotFoundError as err:
            self.drop(pending, [])
            newer = newest_set(self.store)
            if newer is not None and newer.seq != fs.seq:
                raise _Superseded(newer) from None
            self.refuse(name, f"{err} (the set names an object that is missing: damaged remote)")
            return []
        except RemoteError:
            self.drop(pending, [])
            raise
        except (CorruptCheckpointError, OSError) as err:  # OSError: this file cannot be written here
            self.drop(pending, [])
            self.refuse(name, err)
            return []
        except BaseException:
            self.drop(pending, [])
            raise
        return pending

    def download_all(self, fs: FileSet, todo: list[tuple[str, Pending]]) -> list[tuple[str, Pending]]:
        """:meth:`download_unit` for every unit, ``_PARALLEL`` at a time (small files are
        one request each: latency, not bandwidth, bounds them). The first error stops the
        units not started yet and is raised once the started ones are done."""
        if len(todo) <= 1:
            return [(name, self.download_unit(fs, name, p)) for name, p in todo]
        failed: list[BaseException] = []  # (or the caller's own: stop the units not started)

        def one(name: str, pending: Pending) -> tuple[str, Pending]:
            if failed:
                return name, []  # (its temp names are dropped by the caller)
            try:
                return name, self.download_unit(fs, name, pending)
            except BaseException as e:
                failed.append(e)
                raise
        pool = ThreadPoolExecutor(_PARALLEL, thread_name_prefix="spotckpt-pull")
        try:
            futs = [pool.submit(one, name, p) for name, p in todo]
            wait(futs)
        except BaseException as e:  # interrupted here: the downloads in flight end, no more start
            failed.append(e)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if failed:
            raise failed[0]
        return [f.result() for f in futs]

    def place_unit(self, name: str, pending: Pending) -> None:
        for i, (tmp, target, e) in enumerate(pending):
            try:
                os.replace(tmp, target)
            except OSError as err:
                self.drop(pending[i:], [])
                self.refuse(name, err)
                return
            self.got.append(e.path)
            self.bytes += e.size
            self.events.emit("pull_file", path=e.path, bytes=e.size)

    def restore(self, fs: FileSet, on_total: Callable[[int], None] | None) -> None:
        """One attempt at ``fs``: download every unit, then place them all (nothing is
        placed if it raises)."""
        units: dict[str, list[Entry]] = {}
        for e in fs.entries.values():
            if e.link is None:
                units.setdefault(e.unit or e.path, []).append(e)
        if on_total is not None:
            on_total(sum(e.size for es in units.values() for e in es if not (self.root / e.path).exists()))
        made: list[Path] = []
        todo: list[tuple[str, Pending]] = []
        for name in sorted(units, key=lambda n: -max(e.mtime_ns for e in units[n])):  # newest first
            prepared = self.prepare_unit(name, units[name], made)
            if prepared:
                todo.append((name, prepared))
        done: list[tuple[str, Pending]] = []
        try:
            done = self.download_all(fs, todo)
        except BaseException:
            self.drop([p for _, pending in todo for p in pending], [])
            raise
        finally:
            self.drop([], made)  # the dirs left empty (refused units, an attempt given up)
        for name, pending in done:
            self.place_unit(name, pending)
        placed: list[str] = []
        for e in fs.entries.values():
            if e.link is not None and self.link(e):
                placed.append(e.path)
        for rel in placed:  # a chain of in-dir links can still lead out: judge them resolved
            real = Path(os.path.realpath(self.root / rel))
            if self.root not in real.parents:
                log.warning("spotckpt: not restoring symlink %s: it resolves to %s, outside the dir", rel, real)
                try:
                    os.unlink(self.root / rel)
                except OSError:
                    pass
                self.got.remove(rel)
                self.skipped.append(rel)
        self.date_dirs(fs, [e.path for _, pending in done for _, _, e in pending] + placed)

    def date_dirs(self, fs: FileSet, placed: list[str]) -> None:
        """Give each directory the restore wrote into the mtime of the newest entry of the
        set under it. Placing dirs in any order (newest unit first, in parallel) stamps them
        with the restore's own clock, and code that orders its checkpoints by the directory's
        mtime (the Transformers Trainer's rotation) then deletes the wrong one."""
        written = {"/".join(rel.split("/")[:k]) for rel in placed for k in range(1, rel.count("/") + 1)}
        newest: dict[str, int] = {}  # written dir -> its subtree's newest entry in the set
        for rel, e in fs.entries.items():
            parts = rel.split("/")[:-1]
            for d in ("/".join(parts[:k]) for k in range(1, len(parts) + 1)):
                if d in written:
                    newest[d] = max(newest.get(d, 0), e.mtime_ns)
        for d, ns in sorted(newest.items(), key=lambda kv: -kv[0].count("/")):  # deepest first
            try:
                if os.path.isdir(self.root / d) and not os.path.islink(self.root / d):
                    os.utime(self.root / d, ns=(ns, ns))
            except OSError:
                pass  # (a dir the user made read-only: its mtime stays the restore's)

    def link(self, e: Entry) -> bool:
        assert e.link is not None
        target = self.root / e.path
        if not link_inside(e.path, e.link) or not _inside(self.root, target):
            log.warning("spotckpt: not restoring symlink %s -> %s: it points outside the dir", e.path, e.link)
            self.skipped.append(e.path)
            return False
        if os.path.lexists(target):
            return False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(e.link, target)
        except OSError as err:
            log.warning("spotckpt: not restoring symlink %s -> %s: %s", e.path, e.link, err)
            self.skipped.append(e.path)
            return False
        self.got.append(e.path)
        return True

    def sweep(self, named: set[str]) -> None:
        """Set aside local files the set does not name that may be torn."""
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                full = Path(dirpath) / n
                rel = full.relative_to(self.root).as_posix()
                if rel in named or is_internal(rel, self.root) or full.is_symlink():
                    continue
                try:
                    if self.suspect(rel, full.stat()):
                        self.set_aside(rel)
                except OSError:
                    continue


def restore_files(local: LocalDir, store: RemoteStore, *, events: EventLog | None = None,
                  on_total: Callable[[int], None] | None = None) -> tuple[FileSet | None, list[str], int]:
    """Bring the newest committed file set into the local dir, verified.

    Returns:
        ``(set, paths placed, bytes downloaded)``; the set is None when the remote has none.

    Raises:
        RemoteError: the newest set could not be read, or a download failed, after retries
            (a damaged or missing file is refused instead, with an error line: the rest of
            the set is still restored). A set superseded while it is restored (the job
            committed a newer one and deleted its objects) is restarted with the newer one.
    """
    events = events or EventLog(None)
    keys = store.list_keys()  # one listing: foreign objects named, the sets found, the writer's baseline
    warn_foreign(store, keys)
    listing = listing_of(k for k in keys if k.startswith(FILES + "/"))
    moved: set[str] = set()
    try:  # one that does not parse: moved aside, kept
        fs = newest_set(store, listing.sets, on_invalid=quarantiner(store, moved))
    except RemoteNotFoundError:  # superseded since the listing: list again
        fs, listing = newest_set(store, on_invalid=quarantiner(store, moved)), None
    r = _Restore(local, store, events)
    for attempt in range(_RESTARTS + 1):
        if fs is None:
            break
        try:
            r.restore(fs, on_total)
            break
        except _Superseded as s:
            if attempt == _RESTARTS:
                raise RemoteError(f"spotckpt: remote {store.url}: the file set was superseded {_RESTARTS} "
                                  "times while it was restored (the job commits faster than this pull "
                                  "downloads); try again") from None
            log.info("spotckpt: file set %d was superseded by %d while it was restored; restoring that",
                     fs.seq, s.newer.seq)
            fs = s.newer
            listing = None  # (a newer set was committed since the listing)
    # local files the set does not know that may be torn (also when there is no set yet)
    r.sweep(set(fs.entries) if fs is not None else set())
    if listing is not None and not moved:
        hand_over(store, listing)  # the writer that starts next need not list files/ again
    return fs, r.got, r.bytes
