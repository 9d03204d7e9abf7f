"""The watched dir, local -> remote: verified versions, committed as file sets.

Sync layer (no ML imports). See :mod:`._fileset` for the remote layout. One pass:

1. Scan the local dir (``os.scandir``; spotckpt's own entries skipped; names that are not
   UTF-8 skipped with a warning). Group files into units: a directory checkpoint
   (:mod:`._rules`) is one unit, complete once its marker exists; any other file is
   its own unit.
2. Units whose files all match the committed set (size, mtime) are kept. The others, when
   complete and no process holds any of their files open for writing, are uploaded newest
   first (small ones 8 at a time) under a fresh version id; each file is checked unchanged
   (identity, size, mtime, ctime) from before its read to after its checksum
   (:func:`._upload.upload_version`), and again, with no process holding it open for
   writing, after the upload. A unit with a changed
   file is discarded (its objects deleted) and the set keeps the previous version.
3. A new set is written if anything changed (new versions, deletes, links); then the
   objects no set names any more are deleted. A pending step checkpoint preempts a pass:
   the pass commits what it has and returns.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from spotckpt._commit import LocalDir
from spotckpt._errors import RemoteError
from spotckpt._events import EventLog, log
from spotckpt._remote import RemoteStore

from ._baseline import baseline, older
from ._closed import Torn, emptied, open_for_writing, sig, suspect_test, write_beat
from ._fileset import Entry, FileSet, object_key, set_key, write_set
from ._rules import BUILTIN_RULES, MTIME_SLOP_NS, DirRule, WriterGate, unit_of, unit_ready, units_of
from ._scan import scan
from ._upload import _SMALL, upload_version

_PARALLEL = 8
_CHECK_EVERY = 256   # uploaded small units per check that they were closed (one /proc scan each)


@dataclasses.dataclass
class _Sent:
    """One unit's version, uploaded, not yet known to be closed."""

    group: str
    entries: dict[str, Entry]
    sigs: dict[str, tuple[int, int, int, int]]  # (identity, size, mtime, ctime) before the read
    keys: list[str]
    seconds: float


class Watcher:
    """Mirrors the local dir as committed file sets (called from the Syncer's thread).

    Args:
        gate: the supervisor's writer gate (None in-process: the writer is this process).
        busy: returns the subset of absolute paths open for writing.
        should_yield: True when a step checkpoint waits: the pass commits and returns.
    """

    def __init__(self, local: LocalDir, store: RemoteStore, *, events: EventLog | None = None,
                 rules: tuple[DirRule, ...] = BUILTIN_RULES, gate: WriterGate | None = None,
                 busy: Callable[[set[str]], set[str]] = open_for_writing,
                 should_yield: Callable[[], bool] = lambda: False,
                 interval: float = 2.0) -> None:
        self.local, self.store, self.rules, self.gate = local, store, rules, gate
        self.events = events or EventLog(None)
        self.busy, self.should_yield, self.interval = busy, should_yield, interval
        self.current: FileSet | None = None
        self.fence = None  # this job's generation (_fence.Fence), set by the Syncer
        self._loaded = False
        self._orphans: set[str] = set()
        self._keep: set[str] = set()  # objects never deleted in this run (_baseline.py)
        self._warned: set[str] = set()
        self.backlog_bytes = 0          # changed data not yet committed (the planner counts it)
        self.scan_cpu = 0.0             # CPU seconds of the last pass's scan and comparison
        self.bytes_uploaded = 0
        self.upload_seconds = 0.0
        self.hold: set[str] = set()     # paths never to upload in this run (torn by a crash)
        self.settle = False             # wait for a just-emptied file to settle (a flush's pass)
        self._seen_local: set[str] = set()  # units and links this run has seen in the dir
        self._suspect: dict[str, tuple[int, int, int, int]] = {}  # path -> signature not to trust
        self._unreadable: set[str] = set()  # dirs/entries the last scan could not read
        self._last_busy: set[str] = set()   # absolute paths open for writing at the last check
        # The last run's heartbeat, read before this run beats over it (see load()).
        self._born_ns = time.time_ns()
        self._prev_suspect = suspect_test(local.meta)
        # (bytes, monotonic start) of a big file being uploaded: a checkpoint waits for it
        self.uploading: tuple[int, float] | None = None
        self._lock = threading.Lock()

    # -- state -----------------------------------------------------------------------------
    def load(self) -> None:
        """Read the newest committed set (once): the baseline a pass compares against."""
        if self._loaded:
            return
        base = baseline(self.store)
        self.current, self._orphans, self._keep, self._seq = base.current, base.orphans, base.keep, base.seq
        self._loaded = True
        # A killed run's torn files (held back, open for writing at its last heartbeat, or
        # modified after it) that differ from the set stay out until they change again: a
        # restore sets them aside, but a run that did not pull (--no-pull) must not upload them.
        # Files from before this run that are older than their committed version (the dir sat
        # out while the job went on elsewhere) never replace it either.
        cur = self.current.entries if self.current else {}
        for rel, st in self.scan()[0].items():
            e = cur.get(rel)
            if ((e is None or (e.size, e.mtime_ns) != (st.st_size, st.st_mtime_ns))
                    and st.st_mtime_ns < self._born_ns and self._prev_suspect(rel, st)):
                self._suspect[rel] = sig(st)
                log.warning("spotckpt: not mirroring %s: it may be torn (it was being written when the "
                            "last run on this dir was killed); the remote keeps its version", rel)
            elif e is not None and e.link is None and st.st_ctime_ns < self._born_ns and older(st, e):
                self._suspect[rel] = sig(st)
                log.warning("spotckpt: not mirroring %s: it is older than its committed version (this dir "
                            "sat out while the job went on elsewhere); the remote keeps its version", rel)

    def beat(self, *, clean: bool = False) -> None:
        """Record that this watcher is alive (with ``clean``: that it ended cleanly), the
        files held back and the files open for writing (the supervisor's last poll, or this
        watcher's last check): a later run on this dir does not trust them
        (:func:`._closed.suspect_test`)."""
        root = str(self.local.root.resolve()) + os.sep
        writers = self.gate.writers if self.gate is not None else self._last_busy
        rels = {p[len(root):] for p in writers if p.startswith(root)}
        write_beat(self.local.meta, interval=self.interval, clean=clean,
                   hold=self.hold | set(self._suspect), writers=rels)

    def modified_since(self, wall_ns: int, writers: frozenset[str] | set[str],
                       known: dict[str, tuple[int, int, int, int]] | None = None) -> set[str]:
        """Local paths open for writing (``writers``, absolute) or modified at or after
        ``wall_ns`` (unless unchanged since ``known``, absolute path -> signature, taken
        when they were not open): what a writer that died after that moment may have left
        torn."""
        files, _, _ = self.scan()
        root = str(self.local.root.resolve())
        out = set()
        for rel, st in files.items():
            full = os.path.join(root, rel)
            if full in writers or (st.st_mtime_ns >= wall_ns - MTIME_SLOP_NS
                                   and (known is None or known.get(full) != sig(st))):
                out.add(rel)
        return out

    def snapshot(self) -> dict[str, tuple[int, int, int, int]]:
        """Absolute path -> stat signature of every file in the dir now."""
        root = str(self.local.root.resolve())
        return {os.path.join(root, rel): sig(st) for rel, st in self.scan()[0].items()}

    # -- scanning --------------------------------------------------------------------------
    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def scan(self) -> tuple[dict[str, os.stat_result], dict[str, str], dict[str, list[str]]]:
        """``(files, links, dirs)`` of the local dir (:func:`._scan.scan`); what could not
        be read is in ``self._unreadable``."""
        self._unreadable = set()
        return scan(self.local.root, self._warn_once, self._unreadable)

    # -- one pass ----------------------------------------------------------------------------
    def run_pass(self) -> bool:
        """Mirror what changed and commit it. False if the pass yielded to a step
        checkpoint before it was done (what it did is committed; call again)."""
        self.load()
        self.beat()
        cpu0 = time.thread_time()
        files, links, dirs = self.scan()
        units = units_of(dirs, self.rules)
        by_group: dict[str, dict[str, Entry]] = {}
        for p, e in (self.current.entries.items() if self.current else ()):
            if e.link is None:
                by_group.setdefault(e.unit or p, {})[p] = e
        groups: dict[str, list[str]] = {}
        for rel in files:
            groups.setdefault(unit_of(rel, units) or rel, []).append(rel)
        new: dict[str, Entry] = {}
        todo: list[tuple[str, list[str]]] = []
        for g, members in groups.items():
            old = by_group.get(g, {})
            if g in units and not unit_ready(g, units[g], members, files, old):
                new.update(old)  # incomplete: the remote keeps the previous version, if any
                continue
            same = set(old) == set(members) and all(
                old[m].size == files[m].st_size and old[m].mtime_ns == files[m].st_mtime_ns for m in members)
            new.update(old)
            for m in [m for m in members if m in self._suspect]:
                if self._suspect[m] != sig(files[m]):
                    del self._suspect[m]  # written again since: a new version, judged as usual
            if not same and not any(m in self.hold or m in self._suspect for m in members):
                todo.append((g, members))  # (a held file keeps its previous version)
        # A committed entry this run has never seen locally (not pulled: --no-pull, or refused
        # as damaged) is not a local delete: it stays. One seen and then gone is deleted.
        self._seen_local.update(groups)
        self._seen_local.update(links)
        hidden = tuple(u + "/" for u in self._unreadable if u) if "" not in self._unreadable else ("",)
        for g, old in by_group.items():
            if g not in groups and (g not in self._seen_local or g in self._unreadable
                                    or g.startswith(hidden)):
                new.update(old)  # (unreadable now: unknown, not deleted)
        for p, e in (self.current.entries.items() if self.current else ()):
            if e.link is not None and p not in links and p not in self._seen_local:
                new[p] = e
        todo.sort(key=lambda gm: max(files[m].st_mtime_ns for m in gm[1]), reverse=True)
        self.backlog_bytes = sum(files[m].st_size for _, ms in todo for m in ms)
        # What this pass would have cost with nothing to do: the Syncer paces idle passes by
        # it. Not the writers check or the uploads: counted, they stretched the next pass
        # by seconds after every upload, and a closed file waited for it (bench/ row 8).
        self.scan_cpu = time.thread_time() - cpu0
        done = True
        if todo:
            root = self.local.root.resolve()  # as /proc names open files (a symlinked dir)
            busy = self._last_busy = self.busy({str(root / m) for _, ms in todo for m in ms})
            ready = [(g, ms) for g, ms in todo if not any(str(root / m) in busy for m in ms)]
            done = self._upload_groups(ready, files, units, new)
        self._links(links, new)
        self._commit(new)
        return done

    def _links(self, links: dict[str, str], new: dict[str, Entry]) -> None:
        """Add the symlinks whose target is in the set (a link to a file not committed yet
        keeps its previous entry, if any: restore never makes a dangling link of it)."""
        old = self.current.entries if self.current else {}
        dirs = {p.rsplit("/", i)[0] for p in new for i in range(1, p.count("/") + 1)}
        for rel, target in sorted(links.items()):
            to = os.path.normpath(os.path.join(os.path.dirname(rel), target))
            if to in new or to in dirs or to in links:
                new[rel] = Entry(path=rel, link=target)
            elif rel in old and old[rel].link is not None:
                new[rel] = old[rel]

    def _upload_groups(self, ready: list[tuple[str, list[str]]], files: dict[str, os.stat_result],
                       units: dict[str, DirRule], new: dict[str, Entry]) -> bool:
        sent: list[_Sent] = []                    # uploaded, not yet checked closed
        checked: list[tuple[_Sent, float]] = []   # checked closed at (monotonic), to admit
        done = self._send(ready, files, units, new, sent, checked)
        for up, at in checked + self._check_closed(sent):
            self._admit(up, at, new)
        return done

    def _send(self, ready: list[tuple[str, list[str]]], files: dict[str, os.stat_result],
              units: dict[str, DirRule], new: dict[str, Entry], sent: list[_Sent],
              checked: list[tuple[_Sent, float]]) -> bool:
        small: list[tuple[str, list[str]]] = []
        big: list[tuple[str, list[str]]] = []
        for gm in ready:
            (small if sum(files[m].st_size for m in gm[1]) <= _SMALL else big).append(gm)
        if small:
            with ThreadPoolExecutor(_PARALLEL, thread_name_prefix="spotckpt-mirror") as pool:
                for i in range(0, len(small), 4 * _PARALLEL):
                    if i and self.should_yield():
                        return False  # a step checkpoint waits: commit what is done, go on later
                    batch = small[i:i + 4 * _PARALLEL]
                    sent += [r for r in pool.map(lambda gm: self._try_group(gm[0], gm[1], units, files), batch) if r]
                    if len(sent) >= _CHECK_EVERY:
                        # Admitted one round late: the writer gate has seen a poll since.
                        for up, at in checked:
                            self._admit(up, at, new)
                        checked[:] = self._check_closed(sent)
        for g, ms in big:
            if self.should_yield():
                return False
            self.uploading = (sum(files[m].st_size for m in ms), time.monotonic())
            try:
                sent += [r for r in [self._try_group(g, ms, units, files)] if r]
            finally:
                self.uploading = None
        return True

    def _check_closed(self, sent: list[_Sent]) -> list[tuple[_Sent, float]]:
        """The uploaded versions no process holds open for writing now, after their read,
        unchanged since before it; empties ``sent``. (Checked before the read only, a file
        a writer opened just after the check and wrote part of was committed: bench/ row 8.)"""
        if not sent:
            return []
        root = self.local.root.resolve()
        busy = self.busy({str(root / p) for up in sent for p in up.entries})
        at = time.monotonic()  # closed at this moment: the writer gate's reference
        out = []
        for up in sent:
            try:
                bad = next((p for p in up.entries if str(root / p) in busy
                            or sig(st := os.stat(root / p, follow_symlinks=False)) != up.sigs[p]
                            or emptied(st)), None)
            except FileNotFoundError as e:
                bad = str(e)
            if bad is None:
                out.append((up, at))
            else:
                self._discard(up.keys, f"{up.group}: {bad} was open for writing or changed after its read")
        sent.clear()
        return out

    def _admit(self, up: _Sent, checked_at: float, new: dict[str, Entry]) -> None:
        if self.gate is not None:
            root = self.local.root.resolve()
            if not all(self.gate.admit(str(root / p), e.mtime_ns, checked_at, sig=up.sigs[p])
                       for p, e in up.entries.items()):
                self._discard(up.keys, f"{up.group}: its writer died or was not confirmed alive after the close")
                return
        n = sum(e.size for e in up.entries.values())
        with self._lock:
            self.bytes_uploaded += n
            self.upload_seconds += up.seconds
        mtime = max((e.mtime_ns for e in up.entries.values()), default=0) / 1e9  # of what went up
        self.events.emit("mirror_upload", path=up.group, bytes=n, files=len(up.entries),
                         version_mtime=round(mtime, 3))
        self._take(up.group, up.entries, new)

    def _take(self, g: str, got: dict[str, Entry], new: dict[str, Entry]) -> None:
        for p in [p for p, e in new.items() if (e.unit == g or p == g) and e.link is None] \
                if any(e.unit for e in got.values()) else [g]:
            new.pop(p, None)
        new.update(got)

    def _try_group(self, g: str, members: list[str], units: dict[str, DirRule],
                   files: dict[str, os.stat_result]) -> _Sent | None:
        """Upload one unit as a fresh version, or None if it was discarded. Each file must
        still have the signature the scan saw (``files``), before the pass's writers check."""
        vid = uuid.uuid4().hex[:16]
        unit = g if g in units else None
        got: dict[str, Entry] = {}
        sigs: dict[str, tuple[int, int, int, int]] = {}
        t0 = time.monotonic()
        sent: list[str] = []
        try:
            for m in sorted(members):
                sent.append(object_key(vid, m))
                got[m], sigs[m] = upload_version(self.store, self.local.root, m, sent[-1], unit,
                                                 settle=self.settle, seen=sig(files[m]))
        except (Torn, FileNotFoundError) as e:
            self._discard(sent, f"{g}: {e}")
            return None
        except RemoteError:
            self._discard(sent, None)
            raise
        except OSError as e:  # unreadable here (permissions, I/O): this file only, not the pass
            self._discard(sent, None)
            self._warn_once(g, "spotckpt: not mirroring %s: %s", g, e)
            return None
        return _Sent(g, got, sigs, sent, time.monotonic() - t0)

    def _discard(self, keys: list[str], why: str | None) -> None:
        """Delete the objects of a version that will not be committed (a key whose PUT
        never happened is simply absent)."""
        if why:
            log.info("spotckpt: not mirroring %s; the remote keeps the previous version", why)
            self.events.emit("mirror_discarded", reason=why)
        try:
            self.store.rm_many(keys)
        except RemoteError:
            with self._lock:
                self._orphans |= set(keys)

    def _commit(self, new: dict[str, Entry]) -> bool:
        old = self.current.entries if self.current else {}
        if new == old:
            self._collect()
            return False
        self._seq = (fs := write_set(self.store, self.fence, self._seq + 1, new)).seq  # fenced
        prev = self.current
        self.current = fs
        named = {e.key for e in new.values() if e.link is None}
        if prev is not None:
            self._orphans |= {e.key for e in prev.entries.values() if e.link is None and e.key not in named}
            self._orphans.add(set_key(prev.seq))
        self.events.emit("files_committed", seq=fs.seq, entries=len(new),
                         bytes=sum(e.size for e in new.values()))
        self._collect()
        return True

    def _collect(self) -> None:
        """Delete objects no committed set names (superseded versions, deleted files,
        leftovers of a killed run), now that a newer set is durable."""
        if not self._orphans:
            return
        named = {e.key for e in self.current.entries.values()} if self.current else set()
        doomed = sorted(k for k in self._orphans if k not in named and k not in self._keep
                        and (self.current is None or k != set_key(self.current.seq)))
        (self.store.rm_many if self.fence is None else self.fence.rm_many)(doomed)  # newer: kept
        self._orphans.clear()
        if doomed:
            self.events.emit("files_deleted", objects=len(doomed))
