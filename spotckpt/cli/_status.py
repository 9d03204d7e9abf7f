"""``spotckpt status``: the last durable step, the work not yet durable, the upload
throughput, and with ``every="auto"`` the checkpoint schedule in force and why.

Entry-point layer, beside :mod:`._inspect` (whose helpers it uses).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from spotckpt._checkpointer import SCHEDULE_FILE, describe_decision
from spotckpt._commit import LocalDir
from spotckpt._errors import RemoteError
from spotckpt._remote import RemoteStore, _history
from spotckpt._sync import human_bytes, local_freeform, remote_freeform

from ._inspect import _age, _emit, _manifests, _setup


def _throughput(events_path: Path) -> tuple[float | None, int]:
    total_b, total_s, n = 0, 0.0, 0
    try:
        lines = events_path.read_text().splitlines()[-2000:]
    except OSError:
        return None, 0
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") == "upload_done" and e.get("seconds"):
            total_b += int(e.get("bytes") or 0)
            total_s += float(e["seconds"])
            n += 1
    return (total_b / total_s if total_s > 0 else None), n


def _last_events(events_path: Path, names: set[str]) -> dict[str, dict]:
    """The newest event of each name in ``names``."""
    out: dict[str, dict] = {}
    try:
        lines = events_path.read_text().splitlines()[-2000:]
    except OSError:
        return out
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") in names:
            out[e["event"]] = e
    return out


def _holder(local: LocalDir, role: str) -> int | None:
    import psutil

    try:
        text = (local.meta / f"{role}.lock").read_text().strip()
        pid = int(text.split()[-1])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


def cmd_status(args: argparse.Namespace) -> int:
    cfg, local, store = _setup(args)
    now = time.time()
    loc, rem = _manifests(local, store)
    durable = max(rem) if rem else None
    durable_m = rem.get(durable) if durable is not None else None
    newest = max(loc) if loc else None
    pending_steps = [s for s in loc if durable is None or s > durable]
    pending_bytes = sum(loc[s].total_bytes for s in pending_steps[-1:])
    lf = local_freeform(local.root)
    rf = remote_freeform(store) if store is not None else {}
    pending_files = sorted(p for p in lf if rf.get(p) != lf[p])
    pending_bytes += sum(lf[p] for p in pending_files)
    since = None
    if pending_steps or pending_files:
        since = durable_m.created if durable_m is not None else None
        if since is None:
            stamps = [loc[s].created for s in pending_steps]
            stamps += [(local.root / p).stat().st_mtime for p in pending_files if (local.root / p).exists()]
            since = min(stamps) if stamps else None
    rate, n = _throughput(local.meta / "events.jsonl")
    last = _last_events(local.meta / "events.jsonl", {"saved", "flush"})
    estimate = last.get("saved", {}).get("flush_estimate_s")
    flush = last.get("flush")
    doc = {
        "local_dir": str(cfg.local_dir), "state_dir": str(local.meta), "remote": cfg.remote,
        "durable_step": durable, "durable_bytes": durable_m.total_bytes if durable_m else None,
        "durable_age_seconds": round(now - durable_m.created, 1) if durable_m else None,
        "newest_local_step": newest,
        "not_durable_bytes": pending_bytes,
        "not_durable_seconds": round(now - since, 1) if since else 0.0,
        "not_durable_files": pending_files,
        "upload_bytes_per_second": round(rate) if rate else None, "uploads_measured": n,
        "supervisor_pid": _holder(local, "supervisor"), "trainer_pid": _holder(local, "trainer"),
        "flush_estimate_seconds": estimate,
        "last_interruption_flush": flush,
    }
    lines = [
        f"local dir:            {cfg.local_dir}",
        f"state dir:            {local.meta} (spotckpt's own files: events, locks, quarantine)",
        f"remote:               {cfg.remote or '(none)'}",
        f"last durable step:    {durable if durable is not None else '(none)'}"
        + (f"  ({human_bytes(durable_m.total_bytes)}, {_age(durable_m.created, now)} ago)" if durable_m else ""),
        f"newest local step:    {newest if newest is not None else '(none)'}",
        f"not yet durable:      {human_bytes(pending_bytes)}, {doc['not_durable_seconds']:.0f} s of work"
        + (f" ({len(pending_files)} file(s))" if pending_files else ""),
        "upload throughput:    " + (f"{human_bytes(rate)}/s over {n} upload(s)" if rate else "(no uploads logged)"),
        f"running:              supervisor {doc['supervisor_pid'] or '-'}, trainer {doc['trainer_pid'] or '-'}",
        "flush estimate:       " + (f"{estimate:.1f} s for a full save until durable (planner)"
                                    if estimate is not None else "(no save with an upload measured yet)"),
    ]
    if flush:
        lines.append(f"last interruption:    plan {flush.get('action')}, estimated {flush.get('estimate_s')} s, "
                     f"took {flush.get('actual_s')} s, durable step {flush.get('durable_step')}")
    doc["schedule"], doc["history"] = _schedule(local, store, now, lines)
    _emit(args, doc, lines)
    return 0


def _decision_file(local: LocalDir) -> Path | None:
    """``schedule.json`` of this lineage (of rank 0's part in a multi-rank job)."""
    for p in (local.meta / SCHEDULE_FILE, local.meta / "rank-000" / SCHEDULE_FILE,
              *sorted(local.meta.glob(f"rank-*/{SCHEDULE_FILE}"))):
        if p.is_file():
            return p
    return None


def _schedule(local: LocalDir, store: RemoteStore | None, now: float,
              lines: list[str]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """every="auto": the decision in force (the trainer's ``schedule.json``, else the one the
    newest incarnation recorded in the remote's history) and the restarts it saw."""
    hist = None
    if store is not None:
        try:
            h = _history.read(store)
        except RemoteError:
            h = None
        if h is not None and h["incarnations"]:
            summ = _history.summary(h)
            hist = {"ended_incarnations": summ["incarnations"], "ended": summ["ended"], "run_s": summ["run_s"],
                    "startup_s": summ["startup_s"], "listed": h["incarnations"]}
    decision, where = None, None
    path = _decision_file(local)
    if path is not None:
        try:
            decision = json.loads(path.read_text())
            where = f"{path} ({_age(decision.get('ts'), now)} ago, pid {decision.get('pid')})"
        except (OSError, ValueError):
            decision = None
    if decision is None and hist is not None:
        newest = hist["listed"][-1]
        if isinstance(newest.get("decision"), dict):
            decision = newest["decision"]
            where = f"the remote's history (generation {newest['generation']}, {_age(newest.get('seen'), now)} ago)"
    if decision is None and hist is None:
        lines.append("checkpoint schedule:  (no every='auto' decision recorded here)")
        return None, None
    if decision is not None:
        lines.append(f"checkpoint schedule:  {describe_decision(decision)}")
        lines.append(f"  from:               {where}")
        src = decision.get("sources") or {}
        for key, label in (("interval", "interval"), ("c", "C"), ("d", "time to durable"),
                           ("rate", "λ"), ("notice", "notice"), ("grace", "grace")):
            if src.get(key):
                lines.append(f"  {label + ':':<20}{src[key]}")
        decision = {**decision, "from": where}
    if hist is not None:
        ended = ", ".join(f"{n} {k}" for k, n in sorted(hist["ended"].items(), key=lambda kv: -kv[1]))
        running = sum(1 for r in hist["listed"] if r["ended"] == "running")
        starts = hist["ended_incarnations"] + running
        lines.append(f"restarts:             {max(0, starts - 1)} ({starts} start(s) recorded: "
                     + ", ".join(x for x in (ended, f"{running} running" if running else "") if x)
                     + f"; {hist['run_s'] / 3600:.2f} h of running "
                     + ("before the current one)" if running else "in all)"))
    return decision, hist


__all__ = ["cmd_status"]
