"""The ``gen/`` prefix as stored: claim keys, their bodies, listing and pruning.

Storage layer, no ML imports; :mod:`._fence` builds the protocol on it. A *claim* is an
object ``gen/<G:012d>`` whose body is a claim record (JSON: ``format``, ``generation`` = G,
``host``, ``pid``, ``started``; a body written before issue 26 has no ``format`` nor
``generation``). Anything else under ``gen/`` is foreign, whatever its name: another
tool's, a copy kept by hand, a stray number. It never counts as a generation, is never
deleted, and is named in one warning line at each start. A body is read only where it
decides something (the newest key at a claim, a key above the own one at a stale check,
a claim about to be pruned), and never when the listing says it is larger than
:data:`MAX_BODY`.

Each start's record stays recoverable after its key is pruned: a claim's body carries
``history``, the records of the claims before it (those of the claim it saw as the
newest, and of every claim it pruned, read before they are deleted), capped at the newest
:data:`HISTORY_CAP`; ``foreign`` remembers the numbered keys found foreign (name -> tag),
so the next prune does not read them again.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from spotckpt._errors import RemoteNotFoundError

from ._store import RemoteStore

GEN_DIR = "gen"
MAX_GEN = 10**12 - 1
FORMAT = "spotckpt-gen/1"
KEEP = 4            # the newest claims below a new one that stay (the previous incarnations)
PRUNE_MIN = 4       # a start prunes once this many claims are due: a few requests every 4th start
PRUNE_MAX = 256     # claims pruned at most per start (a job from before pruning: over a few starts)
MAX_BODY = 1 << 20  # a claim record stays < 400 KiB with its history and foreign map: larger is foreign, unread
HISTORY_CAP = 1000  # records of earlier claims a claim's body carries
_READERS = 8        # bodies read at once
_TEMP = ".tmp.sagemaker-ignore"  # _fence.create's temp file on file:// (renamed or removed at once)


def gen_name(g: int) -> str:
    return f"{g:012d}"


def gen_key(g: int) -> str:
    return f"{GEN_DIR}/{gen_name(g)}"


def number(name: str) -> int | None:
    """The generation a key name under ``gen/`` can hold (12 digits), else None."""
    return int(name) if len(name) == 12 and name.isdigit() and name.isascii() else None


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object under ``gen/``: its name there, size, and a tag that changes when it is
    written again (S3: the ETag; ``file://``: size, mtime and inode)."""
    name: str
    size: int
    tag: str


def listing(store: RemoteStore, after: str | None = None) -> list[Obj]:
    """Every object under ``gen/`` (whose name sorts after ``after``), sorted by name: every
    page, so no number of keys, foreign or not, hides one (S3: one request per 1,000)."""
    fast = store.fast
    if fast is not None:
        base = store._key(GEN_DIR + "/")

        def s3() -> list[Obj]:
            kw: dict[str, Any] = {"Bucket": fast.bucket, "Prefix": base}
            if after is not None:
                kw["StartAfter"] = base + after
            out = []
            for page in fast.client.get_paginator("list_objects_v2").paginate(**kw):
                out += [Obj(o["Key"][len(base):], int(o.get("Size") or 0), str(o.get("ETag") or ""))
                        for o in page.get("Contents", [])]
            return out
        objs = store._call("listing of generations", lambda: fast._call(s3))
    elif store.is_local:
        def local() -> list[Obj]:
            out = []
            try:
                with os.scandir(store.path(GEN_DIR)) as it:
                    for e in it:
                        try:
                            if not e.is_file(follow_symlinks=False):
                                continue  # a dir or a link is no claim (and a create there is refused)
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        out.append(Obj(e.name, st.st_size, f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"))
            except FileNotFoundError:
                pass
            return out
        objs = store._call("listing of generations", local)
    else:
        objs = [Obj(k[len(GEN_DIR) + 1:], size, str(size)) for k, size in store.find(GEN_DIR).items()]
    return sorted((o for o in objs if after is None or o.name > after), key=lambda o: o.name)


def numbered(objs: Iterable[Obj]) -> list[tuple[int, Obj]]:
    """The objects whose names can be claims, newest number first."""
    return sorted(((n, o) for o in objs if (n := number(o.name)) is not None), key=lambda x: -x[0])


def foreign_names(objs: Iterable[Obj]) -> list[str]:
    """Names under ``gen/`` that can never be claims (a claim's temp file on ``file://`` is
    ours: it lives for the moment of the claim)."""
    return [o.name for o in objs if number(o.name) is None and not o.name.endswith(_TEMP)]


def parse(data: bytes, g: int) -> dict | None:
    """The claim record ``data`` holds for generation ``g``, or None (foreign)."""
    try:
        d = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    started = d.get("started")
    if type(started) not in (int, float) or not math.isfinite(started):
        return None
    if d.get("format") == FORMAT:
        return d if type(d.get("generation")) is int and d["generation"] == g else None
    if "format" not in d and isinstance(d.get("host"), str) and type(d.get("pid")) is int:
        return d  # written before issue 26
    return None


GONE = object()  # read() of an object deleted since it was listed


def read(store: RemoteStore, obj: Obj) -> dict | None | object:
    """The claim record in ``obj``, None if it is foreign, :data:`GONE` if it was deleted
    since it was listed.

    Raises:
        RemoteError: it could not be read (the caller decides what an unknown body means).
    """
    g = number(obj.name)
    if g is None or obj.size > MAX_BODY:
        return None
    try:
        data = store.cat(f"{GEN_DIR}/{obj.name}")
    except RemoteNotFoundError:
        return GONE
    return parse(data, g)


def read_many(store: RemoteStore, objs: list[Obj], until: Callable[[Any], bool] | None = None) -> list[Any]:
    """:func:`read` of ``objs`` in order, :data:`_READERS` at a time, or with ``until``: the
    first alone (usually the answer), then batches, stopping after the batch where
    ``until(result)`` first holds. An object that cannot be read gives its error."""
    def one(o: Obj) -> Any:
        try:
            return read(store, o)
        except Exception as e:  # noqa: BLE001 - handed to the caller, which decides
            return e
    out: list[Any] = []
    i = 0
    while i < len(objs):
        batch = objs[i:i + (1 if until is not None and i == 0 else _READERS)]
        if len(batch) == 1:
            out.append(one(batch[0]))
        else:
            with ThreadPoolExecutor(len(batch)) as pool:
                out += list(pool.map(one, batch))
        if until is not None and any(until(r) for r in out[i:]):
            break
        i += len(batch)
    return out


def _entry(e: Any) -> list | None:
    """A history entry ``[G, started, host, pid, *more]`` as it may be carried on, or None: a
    body spotckpt writes must always read back as a claim record (one that did not would stop
    counting, and a start could claim below it), so what comes from another body is checked.
    Up to 4 more plain values are carried on as they are (a later version's fields, such as how
    an incarnation ended)."""
    if not (isinstance(e, list) and 4 <= len(e) <= 8):
        return None
    g, started, host, pid, *more = e
    if type(g) is not int or not 0 < g <= MAX_GEN or type(started) not in (int, float) \
            or not math.isfinite(started) or not isinstance(host, str) or type(pid) is not int:
        return None
    if not all(m is None or type(m) in (bool, int) or type(m) is float and math.isfinite(m)
               or isinstance(m, str) and len(m) <= 255 for m in more):
        return None
    return [g, started, host[:255], pid, *more]


def history(records: dict[int, dict]) -> list[list]:
    """The compact history of ``records`` (generation -> record, each with its own
    ``history``): one entry ``[G, started, host, pid]`` per claim, newest :data:`HISTORY_CAP`."""
    by_g: dict[int, list] = {}
    for g, rec in records.items():
        hist = rec.get("history")
        for e in hist if isinstance(hist, list) else []:
            if (e := _entry(e)) is not None:
                by_g.setdefault(e[0], e)
        if (e := _entry([g, rec.get("started"), rec.get("host"), rec.get("pid")])) is not None:
            by_g[g] = e
    return [by_g[g] for g in sorted(by_g)[-HISTORY_CAP:]]


def body(g: int, hist: list[list], foreign: dict[str, str]) -> bytes:
    """The claim record of generation ``g`` started now."""
    return json.dumps({"format": FORMAT, "generation": g, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "history": hist,
                       "foreign": dict(sorted(foreign.items())[:HISTORY_CAP])}).encode()


def known_foreign(rec: dict | None, objs: Iterable[Obj]) -> dict[str, str]:
    """Of ``objs`` (the numbered keys below the record's own), those the claim record
    remembers as foreign, as far as they are unchanged (only pruning trusts this: what counts
    as a claim above is always read)."""
    mem = rec.get("foreign") if isinstance(rec, dict) else None
    if not isinstance(mem, dict):
        return {}
    return {o.name: o.tag for o in objs if mem.get(o.name) == o.tag}


def is_counted(r: Any) -> bool:
    """Whether a :func:`read_many` result counts as a claim: a record, or a body that could
    not be read (unknown is not proof of foreign)."""
    return isinstance(r, (dict, Exception))


@dataclasses.dataclass
class Survey:
    """What a start finds under ``gen/`` before it claims."""
    objs: list[Obj]
    taken: set[int]            # every number a key holds, claim or not: never created again
    top: int                   # the newest claim (0: none)
    foreign: dict[str, str]    # numbered keys that are not claims: name -> tag
    records: dict[int, dict]   # the newest claim's record and those of the claims due for pruning
    doomed: list[str]          # claims read (their records kept in the new one's history): to delete

    def previous(self, g: int) -> int:
        """The newest number held below ``g`` (a claim, or unknown: counted)."""
        return max((n for n in self.taken if n < g), default=0)


def survey(store: RemoteStore) -> Survey:
    """One listing of ``gen/`` (every page), the newest claim's body, and, every
    :data:`PRUNE_MIN` th start, the bodies of the claims below the newest :data:`KEEP`."""
    objs = listing(store)
    nums = numbered(objs)
    sv = Survey(objs, {n for n, _ in nums}, 0, {}, {}, [])
    for (n, o), r in zip(nums, read_many(store, [o for _, o in nums], until=is_counted)):
        if r is None:
            sv.foreign[o.name] = o.tag
        elif r is not GONE:
            sv.top = n
            if isinstance(r, dict):
                sv.records[n] = r
                sv.foreign.update(known_foreign(r, [o for m, o in nums if m < n]))
            break
    due = [(n, o) for n, o in nums if n < sv.top and o.name not in sv.foreign][KEEP - 1:]
    if len(due) >= PRUNE_MIN:
        due = due[-PRUNE_MAX:]  # the oldest first
        for (n, o), r in zip(due, read_many(store, [o for _, o in due])):
            if isinstance(r, dict):
                sv.records[n] = r
                sv.doomed.append(o.name)
            elif r is None:
                sv.foreign[o.name] = o.tag
            # GONE: another start pruned it; an error: left for a later prune
    return sv


def delete(store: RemoteStore, names: list[str]) -> None:
    """Delete the claims ``names`` (S3: one request per 1,000; no s3fs)."""
    rels = [f"{GEN_DIR}/{n}" for n in names]
    fast = store.fast
    if not rels:
        return
    if fast is None:
        store.rm_many(rels)
        return

    def s3() -> None:
        for i in range(0, len(rels), 1000):
            chunk = rels[i:i + 1000]
            if len(chunk) == 1:
                fast.client.delete_object(Bucket=fast.bucket, Key=store._key(chunk[0]))
            else:
                fast.client.delete_objects(Bucket=fast.bucket, Delete={
                    "Objects": [{"Key": store._key(r)} for r in chunk], "Quiet": True})
    store._call(f"delete of {len(rels)} generation claims", lambda: fast._call(s3))
