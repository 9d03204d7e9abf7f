"""``spotckpt pull | push``: move checkpoints and the watched dir by hand.

Entry-point layer, beside :mod:`._inspect` (whose settings check and output it shares).
``push`` refuses a local dir older than the remote (exit status 3, nothing written:
:func:`spotckpt._sync.check_not_stale`); ``pull`` defers to the remote and keeps what it
replaces in the state dir.
"""
from __future__ import annotations

import argparse
import time

from spotckpt._events import EventLog
from spotckpt._sync import Progress, Syncer, check_not_stale, human_bytes, local_freeform, pull, remote_freeform

from ._inspect import _emit, _setup


# -- pull / push ---------------------------------------------------------------------------
def cmd_pull(args: argparse.Namespace) -> int:
    cfg, local, store = _setup(args, need_remote=True, create_local=True)
    assert store is not None
    local.lock("supervisor")
    try:
        bar = Progress("pull", enabled=False if args.json else None)
        store.progress = bar.add
        res = pull(local, store, events=EventLog(local.meta / "events.jsonl"), on_total=bar.set_total)
        bar.close()
    finally:
        local.unlock()
    doc = {"local_dir": str(cfg.local_dir), "remote": cfg.remote, **res.__dict__}
    _emit(args, doc, [f"pulled from {cfg.remote} into {cfg.local_dir}: {res.describe()}"])
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from spotckpt._remote import claim
    cfg, local, store = _setup(args, need_remote=True, need_local=True)
    assert store is not None
    local.lock("supervisor")
    t0 = time.monotonic()
    try:
        # Before the claim: a dir older than the remote must not become its newest generation
        # (its old step would win every restore, the newer files would be replaced and deleted).
        check_not_stale(local, store, "spotckpt push", "Run `spotckpt pull` first (it keeps what it "
                        "replaces in the state dir), or push from the dir that holds the newest state")
        events = EventLog(local.meta / "events.jsonl")
        syncer = Syncer(local, store, keep_last=cfg.keep_last, events=events,  # a new generation:
                        mirror=getattr(args, "name", None) is None, fence=claim(store))  # (no files: named)
        steps = local.committed()
        remote_steps = set(store.committed())
        lf, rf = local_freeform(local.root), remote_freeform(store)
        total = sum(v for k, v in lf.items() if rf.get(k) != v)
        if steps and steps[-1] not in remote_steps:
            total += local.read_manifest(steps[-1]).total_bytes
        bar = Progress("push", enabled=False if args.json else None)
        bar.set_total(total)
        store.progress = bar.add
        syncer.start()
        if steps:
            syncer.submit(steps[-1])
        ok = syncer.close()
        bar.close()
    finally:
        local.unlock()
    doc = {"local_dir": str(cfg.local_dir), "remote": cfg.remote, "ok": ok,
           "durable_step": syncer.durable_step, "bytes": syncer.bytes_uploaded,
           "seconds": round(time.monotonic() - t0, 3),
           "error": str(syncer.last_error) if syncer.last_error else None}
    line = (f"pushed {human_bytes(syncer.bytes_uploaded)} to {cfg.remote}; durable step: {syncer.durable_step}"
            if ok else f"spotckpt push: NOT durable: {syncer.last_error}")
    _emit(args, doc, [line])
    return 0 if ok else 1


__all__ = ["cmd_pull", "cmd_push"]
