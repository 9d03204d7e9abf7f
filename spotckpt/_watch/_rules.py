"""What counts as one unit in the watched dir, and what the supervisor knows of writers.

Sync layer (no ML imports).

- :class:`DirRule`: a directory that is one checkpoint (Transformers ``checkpoint-N/``) is
  committed whole, once its marker file exists, and pulled whole.
- :class:`WriterGate`: under ``spotckpt run`` a file that was closed because its writer
  was killed looks closed like any other. The supervisor tells the gate, after every poll,
  that the command was alive and which files it held open for writing; a version checked
  closed before such a confirmation was closed by a live writer. When the command dies of
  a signal (or fails), a version is admitted only if it was not open at the last poll and
  was not modified after it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

from spotckpt._errors import ConfigError

if TYPE_CHECKING:
    from ._fileset import Entry

MTIME_SLOP_NS = 20_000_000  # file mtimes come from a coarse kernel clock: up to a tick (<= 10 ms) early


@dataclasses.dataclass(frozen=True)
class DirRule:
    """A directory matching ``pattern`` is one checkpoint, complete once ``marker`` exists.

    ``pattern`` matches the directory's name (or, if it holds a ``/``, its path relative to
    the watched dir); ``contains``, if set, also requires a file matching it directly inside.
    """

    pattern: str
    marker: str
    contains: str | None = None
    origin: str = "user"

    def matches(self, rel_dir: str, names: Iterable[str]) -> bool:
        name = rel_dir.rsplit("/", 1)[-1]
        if not fnmatch.fnmatchcase(rel_dir if "/" in self.pattern else name, self.pattern):
            return False
        return self.contains is None or any(fnmatch.fnmatchcase(n, self.contains) for n in names)


BUILTIN_RULES: tuple[DirRule, ...] = (
    DirRule("checkpoint-*", "trainer_state.json", origin="Transformers Trainer"),
    DirRule("*.ckpt", "meta.pt", origin="Lightning sharded checkpoint"),
    DirRule("*", ".metadata", contains="*.distcp", origin="torch.distributed.checkpoint"),
)


def parse_rules(specs: Iterable[str]) -> tuple[DirRule, ...]:
    """``GLOB:MARKER`` strings (CLI ``--dir-checkpoint``, ``SPOTCKPT_DIR_CHECKPOINTS``).

    Raises:
        ConfigError: a spec without both parts, or a marker that is not a plain name.
    """
    out = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        glob, sep, marker = spec.rpartition(":")
        if not sep or not glob or not marker or marker.startswith("/") or ".." in marker.split("/"):
            raise ConfigError(f"spotckpt: --dir-checkpoint {spec!r}: use GLOB:MARKER, "
                              "e.g. 'checkpoint-*:trainer_state.json'")
        out.append(DirRule(glob, marker))
    return tuple(out)


def rules_from_env(extra: Iterable[str] = ()) -> tuple[DirRule, ...]:
    env = os.environ.get("SPOTCKPT_DIR_CHECKPOINTS", "")
    return parse_rules([*extra, *env.split(",")]) + BUILTIN_RULES


def units_of(dirs: dict[str, list[str]], rules: tuple[DirRule, ...]) -> dict[str, DirRule]:
    """The directories (relative paths, from ``dirs``: dir -> names inside) that are units;
    the outermost match wins (a unit's subdirs are part of it)."""
    out: dict[str, DirRule] = {}
    for d in sorted(dirs, key=lambda p: p.count("/")):
        if not d or any(d.startswith(u + "/") for u in out):
            continue
        for r in rules:
            if r.matches(d, dirs[d]):
                out[d] = r
                break
    return out


def unit_of(rel: str, units: dict[str, DirRule]) -> str | None:
    parts = rel.split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d in units:
            return d
    return None


def unit_ready(g: str, rule: DirRule, members: list[str], files: dict[str, os.stat_result],
               old: dict[str, Entry]) -> bool:
    """Whether directory checkpoint ``g`` holds one complete version: its marker (the
    file written last) exists and is not older than any other file in it, and, if the
    committed version has the same marker, nothing else changed (a unit rewritten in
    place before its marker, or being deleted file by file, keeps its committed version)."""
    marker = f"{g}/{rule.marker}"
    mk = files.get(marker)
    if mk is None or any(files[m].st_mtime_ns > mk.st_mtime_ns + MTIME_SLOP_NS for m in members):
        return False
    was = old.get(marker)
    if was is not None and (was.size, was.mtime_ns) == (mk.st_size, mk.st_mtime_ns):
        return set(old) == set(members) and all(
            (old[m].size, old[m].mtime_ns) == (files[m].st_size, files[m].st_mtime_ns) for m in members)
    return True


class WriterGate:
    """The supervisor's view of the command's writers, for the watcher (see module doc)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self.alive_at = -math.inf      # monotonic time the command was last seen alive
        self.writers: frozenset[str] = frozenset()   # open for writing at that poll
        self.poll_wall_ns = 0          # wall clock at the start of that poll
        self.ended: str | None = None  # "ok" or "died"
        self.files: dict[str, tuple[int, int, int, int]] | None = None
        self.on_wait: Callable[[], None] | None = None  # asks the supervisor to poll now

    def confirm(self, t_mono: float, wall_ns: int, writers: Iterable[str],
                files: dict[str, tuple[int, int, int, int]] | None = None) -> None:
        """The command was alive at ``t_mono`` (taken before its poll) and held ``writers``
        open for writing; ``wall_ns`` is ``time.time_ns()`` taken before the writers scan.
        ``files`` (absolute path -> stat signature), taken after the writers scan, right
        before the supervisor signals the command: a file not open then and unchanged since
        was closed alive, however short before the signal (no mtime guess)."""
        with self._cv:
            self.alive_at, self.poll_wall_ns, self.writers = t_mono, wall_ns, frozenset(writers)
            if files is not None:
                # A later poll without a snapshot does not make this one wrong: a file closed
                # (not open for writing) and unchanged since a snapshot was closed alive.
                # Dropping it let a poll 10 ms after a forwarded SIGTERM (the watcher asks
                # for one) hold back a save closed 15 ms before it.
                self.files = files
            self._cv.notify_all()

    def ended_with(self, ok: bool) -> None:
        with self._cv:
            self.ended = "ok" if ok else "died"
            self._cv.notify_all()

    def admit(self, path: str, mtime_ns: int, checked_at: float, timeout: float = 5.0,
              sig: tuple[int, int, int, int] | None = None) -> bool:
        """Whether a version of ``path`` (absolute) with ``mtime_ns``, checked closed at
        monotonic ``checked_at``, was closed by a live writer. Waits (bounded) for the next
        confirmation. False also on timeout: the next pass tries again."""
        end = time.monotonic() + timeout
        with self._cv:
            if self.ended is None and self.alive_at <= checked_at and self.on_wait is not None:
                self.on_wait()
            while self.ended is None and self.alive_at <= checked_at:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
            if self.ended == "ok" or self.alive_at > checked_at:
                return True
            return path not in self.writers and (
                mtime_ns < self.poll_wall_ns - MTIME_SLOP_NS
                or (sig is not None and self.files is not None and self.files.get(path) == sig))
