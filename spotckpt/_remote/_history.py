"""The job's incarnation history: one small ``history.json`` per lineage prefix.

Storage layer, no ML imports. ``every="auto"`` (``spotckpt/_checkpointer/_schedule.py``)
needs to know how often this job was restarted and how each incarnation ended; the
generations under ``gen/`` say when a start happened but are pruned, so the history keeps
its own bounded record:

- ``incarnations``: the last :data:`KEEP` starts, each with its generation, wall-clock start,
  the last time it was seen alive (``seen``), its seconds of running time (``run_s``), its
  start-up seconds, its last schedule decision, and how it ended (:data:`ENDINGS`);
- ``totals``: running sums over every ended incarnation, so the rate estimate does not
  shrink when old records fall out of the list.

Written only by the instance that holds the newest generation: read-modify-write right
after its claim (:meth:`Recorder.begin`), then one PUT per durable checkpoint
(:meth:`Recorder.beat`, right after the commit that proved the generation newest) and one at
its end (:meth:`Recorder.end`, after a check of ``gen/``). An incarnation still ``running``
when the next one begins never said how it ended: it was killed without a completed notice
save (``hard-kill``), and its running time is counted up to its last beat.

The history is advice for the schedule, never a condition of correctness: a damaged or
hostile ``history.json`` is replaced with an empty one (one warning line), and a write that
fails is logged and dropped.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from typing import Any, Callable

from spotckpt._errors import RemoteError, StaleGenerationError
from spotckpt._events import redact

from ._store import RemoteStore

log = logging.getLogger("spotckpt")

HISTORY_KEY = "history.json"
FORMAT = "spotckpt-history/1"
KEEP = 32                 # incarnations kept in full; older ones live on in the totals
MAX_BYTES = 1 << 20       # a bigger object is not ours (KEEP records are ~10 KB)
ENDINGS = ("running", "completed", "error", "notice-saved", "notice-late", "hard-kill", "superseded")
# ended without a usable warning: what periodic checkpoints protect against
UNWARNED = ("notice-late", "hard-kill")


def _num(x: Any, default: float = 0.0) -> float:
    """A finite number >= 0 from untrusted input, else ``default``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        return default
    return float(x)


def _record(r: Any) -> dict[str, Any] | None:
    """One incarnation record, checked (None: not a record)."""
    if not isinstance(r, dict):
        return None
    g = r.get("generation")
    if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < 10**12:
        return None
    ended = r.get("ended") if r.get("ended") in ENDINGS else "hard-kill"
    out: dict[str, Any] = {"generation": g, "started": _num(r.get("started")), "seen": _num(r.get("seen")),
                           "run_s": _num(r.get("run_s")), "ended": ended}
    if r.get("startup_s") is not None:
        out["startup_s"] = _num(r.get("startup_s"))
    for k in ("host", "by"):
        if isinstance(r.get(k), str):
            out[k] = r[k][:200]
    if isinstance(r.get("decision"), dict) and len(json.dumps(r["decision"], default=str)) < 4000:
        out["decision"] = r["decision"]
    return out


def empty() -> dict[str, Any]:
    return {"format": FORMAT, "totals": {"incarnations": 0, "run_s": 0.0, "ended": {}, "startup_s": 0.0,
                                         "startups": 0}, "incarnations": []}


def parse(data: bytes) -> dict[str, Any]:
    """The history in ``data``, checked field by field (untrusted: a hostile remote).

    Raises:
        ValueError: not a history this version can read.
    """
    if len(data) > MAX_BYTES:
        raise ValueError(f"{len(data)} bytes")
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("unknown format")
    t = doc.get("totals") if isinstance(doc.get("totals"), dict) else {}
    ended = t.get("ended") if isinstance(t.get("ended"), dict) else {}
    out = empty()
    out["totals"] = {"incarnations": int(_num(t.get("incarnations"))), "run_s": _num(t.get("run_s")),
                     "ended": {k: int(_num(v)) for k, v in ended.items() if k in ENDINGS},
                     "startup_s": _num(t.get("startup_s")), "startups": int(_num(t.get("startups")))}
    recs = doc.get("incarnations") if isinstance(doc.get("incarnations"), list) else []
    out["incarnations"] = [r for r in (_record(x) for x in recs[-4 * KEEP:]) if r is not None][-KEEP:]
    return out


def read(store: RemoteStore) -> dict[str, Any]:
    """The history on ``store`` (an empty one when there is none, or it is damaged)."""
    try:
        data = store.cat(HISTORY_KEY)
    except FileNotFoundError:
        return empty()
    except RemoteError as e:
        if isinstance(e, FileNotFoundError) or "NoSuchKey" in str(e) or "Not Found" in str(e):
            return empty()
        raise
    try:
        return parse(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        log.warning("spotckpt: %s%s is not a history spotckpt can read (%s); starting a new one",
                    redact(store.url), HISTORY_KEY, str(e)[:100])
        return empty()


def _fold(doc: dict[str, Any], rec: dict[str, Any]) -> None:
    """Add an ended incarnation to the totals (once)."""
    t = doc["totals"]
    t["incarnations"] += 1
    t["run_s"] += rec["run_s"]
    t["ended"][rec["ended"]] = t["ended"].get(rec["ended"], 0) + 1
    if rec.get("startup_s") is not None:
        t["startup_s"] += rec["startup_s"]
        t["startups"] += 1


def summary(doc: dict[str, Any], *, exclude: int | None = None) -> dict[str, Any]:
    """What the schedule reads: the totals of the ended incarnations (every one, including
    those no longer listed), the listed ones in order (``runs``: ``[run_s, ended]``, oldest
    first: when the failures came, so that a change of the rate can be seen), the previous
    incarnation's record, the newest decision with a measured C (``measured``: an
    incarnation killed before its first measurement passes nothing on), the mean start-up
    seconds."""
    t = doc["totals"]
    prev = [r for r in doc["incarnations"] if r["generation"] != exclude]
    measured = next((r for r in reversed(prev) if isinstance(r.get("decision"), dict)
                     and r["decision"].get("c_s") is not None), None)
    return {"incarnations": t["incarnations"], "run_s": round(t["run_s"], 3), "ended": dict(t["ended"]),
            "runs": [[round(r["run_s"], 3), r["ended"]] for r in prev if r["ended"] != "running"],
            "startup_s": round(t["startup_s"] / t["startups"], 3) if t["startups"] else None,
            "previous": prev[-1] if prev else None,
            "measured": {"generation": measured["generation"], "decision": measured["decision"]} if measured else None}


def begin_doc(doc: dict[str, Any], generation: int, *, now: float, startup_s: float | None = None,
              host: str | None = None, by: str = "checkpointer") -> dict[str, Any]:
    """``doc`` with every incarnation still ``running`` ended as ``hard-kill`` (it never
    said how it ended), then this one appended as ``running``; at most :data:`KEEP` kept."""
    for r in doc["incarnations"]:
        if r["ended"] == "running" and r["generation"] != generation:
            r["ended"] = "hard-kill"
            _fold(doc, r)
    doc["incarnations"] = [r for r in doc["incarnations"] if r["generation"] != generation]
    rec: dict[str, Any] = {"generation": generation, "started": round(now, 3), "seen": round(now, 3),
                           "run_s": 0.0, "ended": "running", "host": host or socket.gethostname(), "by": by}
    if startup_s is not None:
        rec["startup_s"] = round(startup_s, 3)
    doc["incarnations"].append(rec)
    doc["incarnations"] = doc["incarnations"][-KEEP:]
    return rec


class Recorder:
    """This incarnation's record in the lineage's ``history.json``.

    Example:
        >>> rec = Recorder.begin(store, fence)  # doctest: +SKIP  (after the claim)
        >>> rec.summary["ended"]                 # how the earlier incarnations ended
        {'hard-kill': 1, 'notice-saved': 3}
        >>> rec.beat(); rec.end("completed")
    """

    def __init__(self, store: RemoteStore, fence: Any, doc: dict[str, Any], rec: dict[str, Any], *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.store, self.fence, self.doc, self.rec = store, fence, doc, rec
        self.clock, self.wall = clock, wall
        self.t0 = clock()
        self.summary = summary(doc, exclude=rec["generation"])
        self.decision: Callable[[], dict[str, Any] | None] | None = None  # the schedule's, put in each record
        self.after_beat: Callable[[], None] | None = None  # e.g. the supervisor's copy for its command
        self.ended: str | None = None
        self._lock = threading.RLock()
        self.writes = 0

    @classmethod
    def begin(cls, store: RemoteStore, fence: Any, *, startup_s: float | None = None, by: str = "checkpointer",
              clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> Recorder:
        """Read the history, end the incarnations that never said how they ended, add this
        one (generation ``fence.generation``) and write it back.

        Raises:
            RemoteError: the history could not be read (the caller goes on without one).
        """
        doc = read(store)
        rec = begin_doc(doc, fence.generation, now=wall(), startup_s=startup_s, by=by)
        self = cls(store, fence, doc, rec, clock=clock, wall=wall)
        self._write()
        return self

    @property
    def run_s(self) -> float:
        """Seconds this incarnation has run."""
        return max(0.0, self.clock() - self.t0)

    def _update(self) -> None:
        self.rec["run_s"] = round(self.run_s, 3)
        self.rec["seen"] = round(self.wall(), 3)
        d = self.decision() if self.decision is not None else None
        if d:
            self.rec["decision"] = d

    def _write(self) -> None:
        with self._lock:
            self.store.put_bytes(HISTORY_KEY, json.dumps(self.doc, sort_keys=True, default=str).encode())
            self.writes += 1

    def beat(self) -> None:
        """After a durable checkpoint (its commit just proved this generation the newest):
        this incarnation's running time and decision. Errors are logged, never raised."""
        if self.ended is not None:
            return
        try:
            with self._lock:
                self._update()
                self._write()
            if self.after_beat is not None:
                self.after_beat()
        except Exception as e:  # noqa: BLE001 - advice only: never fail an upload for it
            log.debug("spotckpt: history not updated: %s", e)

    def end(self, how: str, *, timeout: float | None = None) -> bool:
        """Record how this incarnation ended (one of :data:`ENDINGS`), if it still holds the
        newest generation; within ``timeout`` seconds (the rest is abandoned: a notice's
        deadline comes first). True if written."""
        if self.ended is not None or how not in ENDINGS:
            return False
        self.ended = how
        done = threading.Event()
        ok: list[bool] = []

        def go() -> None:
            try:
                if self.fence is not None and getattr(self.fence, "enforced", True):
                    self.fence.check("record of how this incarnation ended")
                with self._lock:
                    self._update()
                    self.rec["ended"] = how
                    _fold(self.doc, self.rec)
                    self._write()
                ok.append(True)
            except StaleGenerationError:
                log.debug("spotckpt: history: a newer generation owns it now")
            except Exception as e:  # noqa: BLE001 - advice only
                log.debug("spotckpt: history not updated at the end: %s", e)
            finally:
                done.set()
        if timeout is None:
            go()
        else:
            threading.Thread(target=go, name="spotckpt-history", daemon=True).start()
            done.wait(max(0.0, timeout))
        return bool(ok)

    def local_copy(self, **extra: Any) -> dict[str, Any]:
        """What a supervised Checkpointer reads from the state dir (it has no remote)."""
        return {"generation": self.rec["generation"], "summary": self.summary, "run_s": round(self.run_s, 3),
                "pid": os.getpid(), **extra}


__all__ = ["ENDINGS", "HISTORY_KEY", "KEEP", "Recorder", "UNWARNED", "begin_doc", "empty", "parse", "read",
           "summary"]
