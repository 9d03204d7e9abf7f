"""What a writer of the watched dir starts from: the committed set, and what it may delete.

Sync layer (no ML imports). One listing of ``files/`` at the start of a writer
(:class:`._watcher.Watcher`): the newest set that parses is the baseline; a newer one that
does not parse is quarantined (:func:`._fileset.quarantine_set`), never deleted. The objects
no set names (a killed run's uploads, superseded versions) are deleted once a newer set is
durable, but only keys of the shapes spotckpt writes (:func:`._fileset.kind`): a user's
``files/data.csv`` is named in a warning and left alone. While a quarantined set exists,
nothing that was under ``files/`` before this start is deleted: the damaged set cannot say
which objects it names (a truncated set lost its entries with its end), and they may be the
only copy of the files it committed.

A local file older than its committed version (:func:`older`: a dir that sat out while
another instance took the job further) never replaces it.
"""
from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from spotckpt._events import log, redact
from spotckpt._remote import RemoteStore

from ._fileset import FILES, MAX_SEQ, Entry, FileSet, list_files, newest_set, quarantiner


@dataclasses.dataclass
class Baseline:
    current: FileSet | None   # the newest set that parses
    orphans: set[str]         # ours, named by no set: deleted once a newer set is durable
    keep: set[str]            # never deleted in this run
    seq: int                  # the highest set number in use


def baseline(store: RemoteStore) -> Baseline:
    """List ``files/`` once, quarantine newer sets that do not parse, and say what a writer
    may delete (warnings name what it leaves alone)."""
    got = list_files(store)
    gone: set[str] = set()  # sets that do not parse, quarantined now
    current = newest_set(store, got.sets, on_invalid=quarantiner(store, gone))
    named = {e.key for e in current.entries.values()} if current else set()
    orphans = {k for k in got.objects if k not in named}
    orphans |= {k for s, k in got.sets.items() if k not in gone and (current is None or s != current.seq)}
    quarantined = got.quarantined | {f"{k}.quarantined" for k in gone}
    # Above every set, quarantined ones too (one repaired and put back stays older), unless
    # that leaves no 12-digit number: a junk SET-999999999999.json, moved aside, takes none.
    seq = max([*got.sets, *(int(k[len(FILES) + 5:len(FILES) + 17]) for k in quarantined)], default=0)
    if seq >= MAX_SEQ:
        seq = max((s for s, k in got.sets.items() if k not in gone), default=0)
    where = f"{redact(store.url)}{FILES}/"
    if got.foreign:
        shown = ", ".join(repr(k) for k in got.foreign[:5])
        more = f" and {len(got.foreign) - 5} more" if len(got.foreign) > 5 else ""
        log.warning("spotckpt: %d object(s) under %s are not spotckpt's; the mirror leaves them alone: %s%s",
                    len(got.foreign), where, shown, more)
    keep: set[str] = set()
    if quarantined:
        keep = set(got.objects)
        log.warning("spotckpt: %s holds %d quarantined file set(s) (%s); the mirror deletes none of the %d "
                    "object(s) there from before this start (they may be the only copy of what a quarantined "
                    "set names): inspect, then delete the quarantined set(s) to let it collect them",
                    where, len(quarantined), ", ".join(sorted(quarantined)[:3]), len(got.objects))
    return Baseline(current, orphans, keep, seq)


def older(st: os.stat_result, e: Entry) -> bool:
    """Whether the local regular file ``st`` differs from committed entry ``e`` and is older
    than it (its mtime is before the committed version's): a dir that sat out while another
    instance took the job further. Such a file never replaces the committed version: a
    restore sets it aside and puts the committed one in its place, a writer does not upload
    it (until it is written again), ``spotckpt push`` refuses. (An equal mtime with other
    content is newer: the kernel's file clock ticks every few ms, and a file rewritten within
    one tick must not be taken for an older one.)"""
    return (st.st_size, st.st_mtime_ns) != (e.size, e.mtime_ns) and st.st_mtime_ns < e.mtime_ns


def stale_files(root: Path, fs: FileSet | None) -> list[str]:
    """The files in the local dir ``root`` that are :func:`older` than their committed version."""
    out = []
    for p, e in (fs.entries.items() if fs is not None else ()):
        if e.link is not None:
            continue
        try:
            st = os.stat(root / p, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and older(st, e):
            out.append(p)
    return sorted(out)
