"""File-set manifests: the committed remote state of the watched dir.

Sync layer (no ML imports). The files a script writes into the local dir by itself
(``checkpoint.pth``, Transformers' ``checkpoint-N/``, Lightning's ``last.ckpt``) reach the
remote with the same guarantee as ``step-N/``: a restart gets one consistent, verified set,
never a mix. Remote layout under the prefix::

    files/<vid>/<path>            one uploaded version of a file (vid: fresh per upload,
                                  shared by the files of one directory checkpoint)
    files/SET-000000000007.json   a file-set manifest, written last

The highest set that parses is the dir's remote state. A set names, for every entry, its
path in the local dir, size, XXH3-128, mtime and object key, or its symlink target. A new
version never overwrites an older one's key, so an upload that is torn, abandoned or killed
cannot replace a complete copy: until the next set is written, the previous set still names
the previous object. Objects that no set names do not exist; the writer deletes them, and
only keys of the shapes above (:func:`kind`): anything else under ``files/`` is somebody
else's. A set that does not parse is quarantined by a writer or a restore, never deleted:
moved to ``files/SET-<n>.json.quarantined`` with its bytes (:func:`quarantine_set`), and the
objects it may name are kept (:mod:`._watcher`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from typing import Any, Callable, Iterable

from spotckpt._commit import _MAX_FILE_SIZE, check_relpath, parse_step_dirname
from spotckpt._config import LINEAGE_PREFIX
from spotckpt._errors import CorruptCheckpointError, RemoteError, RemoteNotFoundError
from spotckpt._events import log
from spotckpt._remote import HISTORY_KEY, RemoteStore

FILES = "files"
FORMAT = "spotckpt-files/1"
_SET_RE = re.compile(r"^SET-(\d{12})\.json$")
_QUARANTINED_RE = re.compile(r"^SET-(\d{12})\.json\.quarantined(?:-[0-9a-f]{8})?$")
_VID_RE = re.compile(r"^[0-9a-f]{16}$")
_TEMP_RE = re.compile(r"\.[0-9a-f]{8}\.tmp\.sagemaker-ignore$")  # a killed atomic write's temp file (file://)
MAX_SEQ = 10**12 - 1   # set numbers keep 12 digits: a wider name would not be listed as a set
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MAX_MTIME_NS = 2**63  # os.utime takes a signed 64-bit ns count (pre-1970 mtimes are legal)
_MAX_LINK = 4095       # PATH_MAX less the NUL: os.symlink refuses a longer target
_RELISTS = 5           # a set that vanished while read was superseded: list again, this often


def set_key(seq: int) -> str:
    return f"{FILES}/SET-{seq:012d}.json"


def object_key(vid: str, path: str) -> str:
    return f"{FILES}/{vid}/{path}"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One mirrored entry: a regular file (``key`` set) or a symlink (``link`` set)."""

    path: str
    size: int = 0
    xxh3: str = ""
    mtime_ns: int = 0
    key: str = ""
    link: str | None = None
    unit: str | None = None  # the directory checkpoint this file belongs to

    def to_dict(self) -> dict[str, Any]:
        if self.link is not None:
            return {"path": self.path, "link": self.link}
        d: dict[str, Any] = {"path": self.path, "size": self.size, "xxh3": self.xxh3,
                             "mtime_ns": self.mtime_ns, "key": self.key}
        if self.unit is not None:
            d["unit"] = self.unit
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        path = check_relpath(str(d["path"]))
        path.encode("utf-8")  # names that are not UTF-8 are never mirrored (UnicodeError: invalid)
        if "link" in d:
            link = str(d["link"])
            if not link or "\x00" in link or len(link.encode("utf-8")) > _MAX_LINK:
                raise ValueError(f"bad link target for {path!r}")
            return cls(path=path, link=link)
        size, mtime = int(d["size"]), int(d["mtime_ns"])
        digest, key = str(d["xxh3"]), check_relpath(str(d["key"]))
        unit = d.get("unit")
        if (not 0 <= size <= _MAX_FILE_SIZE or not -_MAX_MTIME_NS <= mtime < _MAX_MTIME_NS or not _HEX32.match(digest)
                or not key.startswith(FILES + "/")):
            raise ValueError(f"bad entry for {path!r}")
        if unit is not None and not path.startswith(check_relpath(str(unit)) + "/"):
            raise ValueError(f"entry {path!r} is not inside its unit {unit!r}")
        return cls(path=path, size=size, xxh3=digest, mtime_ns=mtime, key=key,
                   unit=None if unit is None else str(unit))


@dataclasses.dataclass(frozen=True)
class FileSet:
    seq: int
    entries: dict[str, Entry]
    created: float = 0.0
    generation: int = 0  # of the job that wrote it (_remote/_fence.py); 0: before generations

    def to_json(self) -> bytes:
        d = {"format": FORMAT, "seq": self.seq, "created": self.created or time.time(),
             "entries": [e.to_dict() for _, e in sorted(self.entries.items())]}
        if self.generation:
            d["generation"] = self.generation
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, expect_seq: int | None = None) -> FileSet:
        """Parse an untrusted set; raises CorruptCheckpointError on anything odd."""
        try:
            d = json.loads(data)
            if d.get("format") != FORMAT:
                raise ValueError(f"unknown format {d.get('format')!r}")
            seq = int(d["seq"])
            if expect_seq is not None and seq != expect_seq:
                raise ValueError(f"set says seq {seq}, its name {expect_seq}")
            entries: dict[str, Entry] = {}
            for raw in d["entries"]:
                e = Entry.from_dict(raw)
                if e.path in entries:
                    raise ValueError(f"{e.path!r} listed twice")
                entries[e.path] = e
            gen = d.get("generation", 0)
            if type(gen) is not int or not 0 <= gen < 10**12:
                raise ValueError(f"bad generation {gen!r}")
            return cls(seq=seq, entries=entries, created=float(d.get("created", 0.0)), generation=gen)
        except CorruptCheckpointError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            raise CorruptCheckpointError(f"spotckpt: invalid file set: {type(e).__name__}: {e}"[:300]) from e


def write_set(store: RemoteStore, fence: Any, seq: int, entries: dict[str, Entry]) -> FileSet:
    """Commit ``entries`` as file set ``seq`` (with a ``fence``, :class:`spotckpt._remote._fence.Fence`: as
    this generation, proven the newest, at the next free number above an older one's set).

    Raises:
        RemoteError: no 12-digit set number is left above ``seq - 1`` (a hostile set named
            ``SET-999999999999.json``): a wider name would never be read.
    """
    if seq > MAX_SEQ:
        raise RemoteError(f"spotckpt: remote {store.url}: no file-set number left after {set_key(seq - 1)} "
                          "(not written by spotckpt at this pace: inspect it, and remove it if it is not yours)")
    gen = fence.generation if fence is not None else 0
    created = time.time()

    def make(n: int) -> bytes:
        return FileSet(seq=n, entries=entries, created=created, generation=gen).to_json()
    if fence is None:
        store.put_data(set_key(seq), make(seq))
    else:
        seq = fence.commit_set(seq, make, lambda data: FileSet.from_json(data).generation, set_key)
    return FileSet(seq=seq, entries=entries, created=created, generation=gen)


def kind(rel: str) -> str | None:
    """What a key under the prefix is, if spotckpt writes keys of its shape under ``files/``:
    ``"set"`` (``files/SET-<12 digits>.json``), ``"quarantined"`` (such a set moved aside),
    ``"object"`` (``files/<16 hex>/<path>``: one uploaded version), ``"temp"`` (an atomic
    write's temp file a killed process left on ``file://``), else None: not spotckpt's (a
    user's ``files/data.csv``), never deleted."""
    first, sep, rest = rel.partition("/")
    if first != FILES or not sep:
        return None
    if _SET_RE.match(rest):
        return "set"
    if _QUARANTINED_RE.match(rest):
        return "quarantined"
    vid, sep, path = rest.partition("/")
    if _VID_RE.match(vid) and sep and path and not path.endswith("/"):
        return "object"
    base = _TEMP_RE.sub("", rest)
    if base != rest and _SET_RE.match(base):
        return "temp"
    return None


@dataclasses.dataclass
class Listing:
    """One listing of ``files/``, by :func:`kind`."""

    sets: dict[int, str]   # seq -> set key
    objects: set[str]      # uploaded versions and temp leftovers: ours to delete when no set names them
    quarantined: set[str]  # sets moved aside as damaged: kept, and what they may name too
    foreign: list[str]     # not spotckpt's: left alone


def list_files(store: RemoteStore) -> Listing:
    out = Listing({}, set(), set(), [])
    for rel in store.list_keys(FILES + "/"):
        k = kind(rel)
        if k == "set":
            out.sets[int(rel[len(FILES) + 5:len(FILES) + 17])] = rel
        elif k == "quarantined":
            out.quarantined.add(rel)
        elif k is None:
            out.foreign.append(rel)
        else:
            out.objects.add(rel)
    out.foreign.sort()
    return out


def list_files_prefix(store: RemoteStore) -> tuple[dict[int, str], set[str]]:
    """One listing of ``files/``: ``({seq: set key}, {every object key of ours that is not a set})``."""
    got = list_files(store)
    return got.sets, got.objects


def quarantine_set(store: RemoteStore, rel: str, data: bytes, why: object) -> str:
    """Move the damaged set ``rel`` (its bytes ``data``) aside as ``<rel>.quarantined``
    (``-<8 hex>`` added when that name is taken): kept for inspection, invisible to readers.
    With a fence on the store (a writer's start), only while its generation is the newest.
    Returns the new key."""
    fence = getattr(store, "fence", None)
    if fence is not None:
        fence.check("quarantine of a damaged file set")
    dest = f"{rel}.quarantined"
    if store.exists(dest):
        dest += f"-{uuid.uuid4().hex[:8]}"
    store.put_bytes(dest, data)
    store.rm(rel)
    log.warning("spotckpt: remote file set %s is damaged (%s); quarantined as %s with every object it "
                "may name (delete it once inspected)", rel, why, dest)
    return dest


def quarantiner(store: RemoteStore, moved: set[str]) -> Callable[[str, bytes, CorruptCheckpointError], None]:
    """An ``on_invalid`` for :func:`newest_set` that quarantines each invalid set, adding
    its original key to ``moved``."""
    def q(rel: str, data: bytes, e: CorruptCheckpointError) -> None:
        quarantine_set(store, rel, data, e)
        moved.add(rel)
    return q


def newest_set(store: RemoteStore, sets: dict[int, str] | None = None, *,
               on_invalid: Callable[[str, bytes, CorruptCheckpointError], None] | None = None) -> FileSet | None:
    """The newest file set that parses, or None when the remote has none.

    A set that is invalid (unparseable, hostile content) is skipped: named in a warning, or
    handed to ``on_invalid(key, bytes, error)`` (a writer's or a restore's start moves it
    aside: :func:`quarantiner`; ``verify`` reports it).
    A set that vanished between the listing and its read was superseded meanwhile: the
    prefix is listed again (when ``sets``, the caller's listing, was given, the
    RemoteNotFoundError is raised instead: the caller lists again). Any other RemoteError
    (a read that failed after retries) is raised: falling back to an older set would
    restore files whose newer versions are committed, and the watcher would then commit
    them over those.
    """
    given = sets is not None
    for _ in range(_RELISTS):
        if sets is None:
            sets = list_files_prefix(store)[0]
        for seq in sorted(sets, reverse=True):
            data = b""
            try:
                data = store.cat(sets[seq])
                return FileSet.from_json(data, expect_seq=seq)
            except CorruptCheckpointError as e:
                if on_invalid is None:
                    log.warning("spotckpt: remote file set %s is invalid (%s); trying the one before", sets[seq], e)
                else:
                    on_invalid(sets[seq], data, e)
            except RemoteNotFoundError:
                if given:
                    raise
                break  # superseded while we read: list again
        else:
            return None
        sets = None
    raise RemoteError(f"spotckpt: remote {store.url}: the newest file set changed {_RELISTS} times while "
                      "it was read (is another job writing to this remote?); try again")


def foreign(keys: Iterable[str]) -> list[str]:
    """Keys under the prefix that are neither a step checkpoint's, the watched dir's (of a
    shape :func:`kind` knows), a named Checkpointer's (``ckpt-<name>/``), the job's history nor
    spotckpt's probe: somebody else's objects, skipped by restore and never deleted by the mirror."""
    out = []
    for k in keys:
        first, sep, _ = k.partition("/")
        if first == FILES and kind(k) is not None:
            continue  # (a key under files/ of a shape spotckpt never writes is foreign)
        if sep and (first == "gen" or parse_step_dirname(first) is not None):
            continue
        if first.startswith(".spotckpt-probe-") or k == HISTORY_KEY:
            continue
        if sep and first.startswith(LINEAGE_PREFIX):
            continue  # a named Checkpointer's checkpoints: its own lineage
        out.append(k)
    return sorted(out)


def warn_foreign(store: RemoteStore, keys: Iterable[str]) -> list[str]:
    """Name the foreign objects in one warning line; returns them."""
    odd = foreign(keys)
    if odd:
        shown = ", ".join(repr(k) for k in odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        log.warning("spotckpt: %d object(s) under %s are not spotckpt's and were skipped: %s",
                    len(odd), store.url, shown)
    return odd
