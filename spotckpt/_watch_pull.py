"""The watched dir, remote -> local: restore the newest committed file set.

Sync layer (no ML imports). Every file is downloaded to a temp name beside its place,
verified (size, XXH3-128), given the mtime it had when it was mirrored and renamed into
place; a directory checkpoint is placed only when all its files verified. Symlinks are
recreated when they point inside the dir (a set naming one that points outside is refused
with a warning: never followed). Files already present with the committed size and mtime
are kept.

A local file that differs from the set is kept as newer (the watcher uploads it) unless it
may be torn: held back by the last supervisor, or modified after the last heartbeat of the
watcher that was running here minus one interval (that watcher was killed; see
:class:`._watch.Watcher.beat`). Such a file is moved to the state dir's ``suspect/`` and
the committed version takes its place.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from ._errors import CorruptCheckpointError
from ._events import EventLog, log
from ._fileset import Entry, FileSet, list_files_prefix, newest_set, warn_foreign
from ._local import TMP_SUFFIX, LocalDir, is_internal
from ._manifest import file_digest
from ._store import RemoteStore
from ._closed import suspect_test

def _inside(root: Path, target: Path) -> bool:
    """True if ``target``'s parent resolves inside ``root`` (no symlinked dir escapes)."""
    try:
        parent = target.parent.resolve()
    except OSError:
        return False
    return parent == root or root in parent.parents


class _Restore:
    def __init__(self, local: LocalDir, store: RemoteStore, events: EventLog) -> None:
        self.local, self.store, self.events = local, store, events
        self.root = local.root.resolve()
        self.suspect = suspect_test(local.meta)
        self.got: list[str] = []
        self.bytes = 0
        self.skipped: list[str] = []

    def set_aside(self, rel: str) -> None:
        dest = self.local.meta / "suspect" / f"{int(time.time())}-{uuid.uuid4().hex[:6]}" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.root / rel), dest)
        log.warning("spotckpt: %s may be torn (it was being written when the last run was killed); "
                    "the committed version replaces it, the local one is kept at %s", rel, dest)
        self.events.emit("file_set_aside", path=rel, to=str(dest))

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
        return False  # newer locally: the watcher uploads it

    def fetch_unit(self, name: str, entries: list[Entry]) -> None:
        todo = [e for e in entries if self.wanted(e)]
        placed: list[tuple[Path, Path, Entry]] = []
        made: list[Path] = []  # dirs this unit created: removed again if it is refused
        try:
            for e in todo:
                target = self.root / e.path
                if not _inside(self.root, target):
                    raise CorruptCheckpointError(f"spotckpt: {e.path!r} would be written outside {self.root}")
                made += [d for d in [target.parent, *target.parent.parents] if d not in made
                         and (d == self.root or self.root in d.parents) and not d.exists()]
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
                placed.append((tmp, target, e))
                self.store.get_file(e.key, tmp)
                size = tmp.stat().st_size
                if size != e.size:
                    raise CorruptCheckpointError(f"spotckpt: {e.path}: downloaded {size} bytes, the set says {e.size}")
                if file_digest(tmp) != e.xxh3:
                    raise CorruptCheckpointError(f"spotckpt: {e.path} fails its checksum")
                os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))
        except (CorruptCheckpointError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
            for tmp, _, _ in placed:
                tmp.unlink(missing_ok=True)
            for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            self.skipped.append(name)
            log.error("spotckpt: not restoring %s: %s", name, err)
            self.events.emit("pull_file_refused", path=name, error=str(err))
            return
        except BaseException:
            for tmp, _, _ in placed:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, target, e in placed:
            os.replace(tmp, target)
            self.got.append(e.path)
            self.bytes += e.size
            self.events.emit("pull_file", path=e.path, bytes=e.size)

    def link(self, e: Entry) -> None:
        assert e.link is not None
        target = self.root / e.path
        joined = os.path.normpath(os.path.join(os.path.dirname(e.path), e.link))
        if os.path.isabs(e.link) or joined == ".." or joined.startswith("../") or not _inside(self.root, target):
            log.warning("spotckpt: not restoring symlink %s -> %s: it points outside the dir", e.path, e.link)
            self.skipped.append(e.path)
            return
        if os.path.lexists(target):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(e.link, target)
        self.got.append(e.path)


def restore_files(local: LocalDir, store: RemoteStore, *, events: EventLog | None = None,
                  on_total: Callable[[int], None] | None = None) -> tuple[FileSet | None, list[str], int]:
    """Bring the newest committed file set into the local dir, verified.

    Returns:
        ``(set, paths placed, bytes downloaded)``; the set is None when the remote has none.

    Raises:
        RemoteError: a download failed after retries (a damaged file is refused instead,
            with an error line: the rest of the set is still restored).
    """
    events = events or EventLog(None)
    warn_foreign(store, store.list_keys())
    sets, _ = list_files_prefix(store)
    fs = newest_set(store, sets)
    r = _Restore(local, store, events)
    if fs is None:
        return None, [], 0
    units: dict[str, list[Entry]] = {}
    for e in fs.entries.values():
        if e.link is None:
            units.setdefault(e.unit or e.path, []).append(e)
    if on_total is not None:
        on_total(sum(e.size for es in units.values() for e in es if not (local.root / e.path).exists()))
    for name in sorted(units, key=lambda n: -max(e.mtime_ns for e in units[n])):
        r.fetch_unit(name, units[name])
    for e in fs.entries.values():
        if e.link is not None:
            r.link(e)
    # local files the set does not know that may be torn: set aside as well
    named = set(fs.entries)
    for dirpath, _dirs, names in os.walk(r.root):
        for n in names:
            full = Path(dirpath) / n
            rel = full.relative_to(r.root).as_posix()
            if rel in named or is_internal(rel, r.root) or full.is_symlink():
                continue
            try:
                if r.suspect(rel, full.stat()):
                    r.set_aside(rel)
            except OSError:
                continue
    return fs, r.got, r.bytes

