"""Files closed in the watched dir, as they close: inotify (Linux), so a pass starts at once.

Sync layer (no ML imports). A recursive watch on the local dir (new subdirs are added as
they appear; spotckpt's own entries are not watched) for ``IN_CLOSE_WRITE`` and
``IN_MOVED_TO`` (a file closed after writing, or renamed into place) and for deletes; each
calls ``on_change()`` from a daemon thread. The caller then runs an ordinary pass
(:meth:`._watcher.Watcher.run_pass`): events only ever make a pass come sooner, never
decide what it uploads, so every guarantee of the scan (a torn file never committed, stale
files, rules, file sets) holds unchanged.

The periodic scan stays, as the fallback and the safety net: where inotify is unavailable
(not Linux, ``inotify_simple`` not installed, no inotify instance left), when the watch
limit is hit (``ENOSPC``: ``fs.inotify.max_user_watches``) and after ``IN_Q_OVERFLOW``
(events lost: one full pass at once). :attr:`Changes.ok` says whether events can be relied
on; :attr:`Changes.why` why not.

The library is ``inotify_simple`` (a small, well-kept ctypes wrapper: the syscalls and the
event struct, nothing else) rather than ctypes here; it is an optional dependency (Linux
only): without it the scan runs as before.
"""
from __future__ import annotations

import errno
import os
import select
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from spotckpt._commit import is_internal
from spotckpt._events import log

try:  # optional (Linux only): without it the periodic scan is all there is
    import inotify_simple as _ino
except ImportError:  # pragma: no cover - depends on the install
    _ino = None


EVENT_CPU = 0.05  # share of a core the passes that events start may take while a writer keeps closing files


def next_pass_in(since: float, changed: bool, idle: float, interval: float, scan_cost: float) -> float:
    """Seconds until the next pass is due, ``since`` s after the last one began: the idle
    interval (``idle``), or, once a file was closed (``changed``), at once, paced so that a
    writer closing files all the time costs at most ``EVENT_CPU`` of a core in passes whose
    scan costs ``scan_cost`` CPU-s (never later than the scan ``interval``)."""
    if changed:
        return min(interval, scan_cost / EVENT_CPU) - since
    return idle - since


def _masks() -> tuple[int, int]:
    f = _ino.flags
    files = f.CLOSE_WRITE | f.MOVED_TO | f.MOVED_FROM | f.DELETE | f.CREATE
    return int(files | f.DELETE_SELF | f.ONLYDIR | f.DONT_FOLLOW), int(f.ISDIR)


class Changes:
    """A recursive inotify watch on ``root`` calling ``on_change()`` (from its own thread)
    when a file there is closed after writing, moved in, deleted, or a dir appears.

    Example:
        >>> c = Changes(Path("/opt/ml/checkpoints"), on_change=syncer_poke)  # doctest: +SKIP
        >>> c.ok    # False: not available here, the periodic scan is all there is
        >>> c.close()

    Args:
        root: the local dir.
        on_change: called with no arguments, once per batch of events; also after events
            were lost (``IN_Q_OVERFLOW``: one full pass catches up).
        max_watches: stop adding watches past this many, as if the kernel's limit was hit
            (tests; the kernel's own limit gives ``ENOSPC`` the same way).
    """

    def __init__(self, root: Path, on_change: Callable[[], None], *, max_watches: int | None = None) -> None:
        self.root, self.on_change, self.max_watches = root, on_change, max_watches
        self.ok, self.why = False, ""
        self.events = 0          # batches of events seen
        self.overflows = 0       # IN_Q_OVERFLOW seen
        self._wds: dict[int, str] = {}   # watch descriptor -> dir relative to root ("" for root)
        self._stop = False
        self._ino: Any = None
        self._thread: threading.Thread | None = None
        if _ino is None or not sys.platform.startswith("linux"):
            self.why = "inotify is not available here (Linux and the inotify_simple package)"
            return
        try:
            self._ino = _ino.INotify(nonblocking=False)
        except OSError as e:  # EMFILE: the per-user instance limit
            self.why = f"no inotify instance: {e.strerror or e}"
            return
        self._mask, self._isdir = _masks()
        self.ok = True
        self._add_tree("")
        if self.ok and not self._wds:
            self.ok, self.why = False, f"{root} cannot be watched (it does not exist yet, or is not a dir)"
        if not self.ok:
            self._ino.close()
            return
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="spotckpt-inotify", daemon=True)
        self._thread.start()

    # -- watches -----------------------------------------------------------------------------
    def _add_tree(self, top: str) -> None:
        """Watch dir ``top`` (relative) and every dir under it, skipping spotckpt's own."""
        stack = [top]
        while stack and self.ok:
            rel = stack.pop()
            if rel and is_internal(rel, self.root):
                continue
            full = os.path.join(self.root, rel) if rel else str(self.root)
            if self.max_watches is not None and len(self._wds) >= self.max_watches:
                self._give_up(errno.ENOSPC)
                return
            try:
                wd = self._ino.add_watch(full, self._mask)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP):
                    continue  # gone, replaced, or unreadable (the scan says so)
                self._give_up(e.errno)
                return
            self._wds[wd] = rel
            try:
                with os.scandir(full) as it:
                    stack += [f"{rel}/{e.name}" if rel else e.name for e in it
                              if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue

    def _give_up(self, err: int | None) -> None:
        self.ok = False
        self.why = ("the inotify watch limit was hit (fs.inotify.max_user_watches)" if err == errno.ENOSPC
                    else f"inotify failed: {os.strerror(err) if err else 'unknown error'}")
        (log.warning if err == errno.ENOSPC else log.info)(
            "spotckpt: %s: the watched dir %s is scanned periodically instead", self.why, self.root)

    # -- events ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                try:
                    ready, _, _ = select.select([self._ino.fileno(), self._stop_r], [], [])
                    if self._stop or self._stop_r in ready:
                        return
                    got = self._ino.read(timeout=0)
                except OSError as e:
                    self._give_up(e.errno)
                    return
                if got and self._take(got):
                    self.events += 1
                    try:
                        self.on_change()
                    except Exception:  # noqa: BLE001 - a poke never stops the watch
                        log.debug("spotckpt: on_change failed", exc_info=True)
        finally:  # the fds are closed by the thread that reads them (never a reused number)
            self._ino.close()
            os.close(self._stop_r)
    def _take(self, got: list[Any]) -> bool:
        """Add watches for new dirs; True if any event concerns a user file (or events were lost)."""
        relevant = False
        overflow = int(_ino.flags.Q_OVERFLOW)
        for ev in got:
            if ev.mask & overflow:
                self.overflows += 1
                relevant = True  # events were lost: one full pass now
                continue
            parent = self._wds.get(ev.wd)
            if parent is None:
                continue
            if not ev.name:  # the watched dir itself (deleted): its watch is gone
                if ev.mask & int(_ino.flags.DELETE_SELF) or ev.mask & int(_ino.flags.IGNORED):
                    self._wds.pop(ev.wd, None)
                continue
            rel = f"{parent}/{ev.name}" if parent else ev.name
            if is_internal(rel, self.root):
                continue
            if ev.mask & self._isdir:
                if ev.mask & (int(_ino.flags.CREATE) | int(_ino.flags.MOVED_TO)):
                    self._add_tree(rel)  # (files closed in it before its watch: the pass finds them)
                relevant = True
            elif ev.mask & int(_ino.flags.CREATE):
                continue  # opened for writing, not closed yet: its close comes next
            else:
                relevant = True
        return relevant

    def close(self) -> None:
        """Stop watching (the reader thread closes its fds as it leaves); never blocks."""
        if self._stop:
            return
        self._stop, self.ok = True, False
        if self._thread is None:
            if self._ino is not None:
                self._ino.close()
            return
        try:
            os.write(self._stop_w, b"x")
        finally:
            os.close(self._stop_w)
