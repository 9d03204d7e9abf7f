"""``spotckpt ls | verify``: look at checkpoints by hand (``status``: :mod:`._status`;
``pull``/``push``: :mod:`._move`).

Entry-point layer: thin wrappers over the local dir, the remote store and the events log.
Each returns an exit status and prints a table, or one JSON document with ``--json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from spotckpt._commit import LINEAGE_MARKER, LocalDir, Manifest, hasher, verify_dir
from spotckpt._config import _UNSET, LINEAGE_PREFIX, Config, probe_local_dir, require_dir
from spotckpt._errors import ConfigError, CorruptCheckpointError, RemoteError
from spotckpt._remote import RemoteStore
from spotckpt._sync import human_bytes, local_freeform, open_remote, remote_freeform
from spotckpt._watch import FileSet, newest_set


def _setup(args: argparse.Namespace, *, need_remote: bool = False, create_local: bool = False,
           need_local: bool = False) -> tuple[Config, LocalDir, RemoteStore | None]:
    """Resolve and check the settings of one command (ConfigError, LocalDirError,
    RemoteError: one line and exit status 2, see cli.main).

    Args:
        create_local: the command writes into the local dir (pull): create and probe it.
        need_local: the local dir must exist (push); read-only commands take a missing one
            as empty (``ls --remote`` on a machine that never trained). A local dir that is
            a file is an error for every command.
    """
    cfg = Config.resolve(local_dir=args.local_dir, remote=args.remote if args.remote else _UNSET,
                         check_local=False, name=getattr(args, "name", None))
    require_dir(cfg.local_dir, must_exist=need_local)
    local = LocalDir(cfg.local_dir).lineage(cfg.name)
    if cfg.name is not None:  # Checkpointer(name=): a local dir and a remote of its own
        if create_local:
            local.mark_lineage()
        cfg = dataclasses.replace(cfg, local_dir=local.root, remote=cfg.lineage_remote, name=None)
    if need_remote and not cfg.remote:
        raise ConfigError(f"spotckpt {args.command}: no remote; pass --remote s3://bucket/prefix/ "
                          "or set SPOTCKPT_REMOTE")
    if create_local:
        probe_local_dir(cfg.local_dir)
    # Fail within seconds, in one line, when the remote is unreachable: a write probe for
    # commands that upload, a listing and an existence check (bucket, file:// dir) for the
    # read-only ones, so a missing bucket is an error and not an empty remote.
    probe = "write" if args.command == "push" else "read"
    store = open_remote(cfg.remote, cfg.storage_options, probe=probe, attempts=3) if cfg.remote else None
    return cfg, local, store


def _emit(args: argparse.Namespace, doc: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print("\n".join(lines))


def _age(created: float | None, now: float) -> str:
    if not created:
        return "-"
    s = max(0.0, now - created)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.1f}{unit}"
    return f"{s:.0f}s"


def _manifests(local: LocalDir, store: RemoteStore | None) -> tuple[dict[int, Manifest], dict[int, Manifest | None]]:
    loc: dict[int, Manifest] = {}
    for s in local.committed():
        try:
            loc[s] = local.read_manifest(s)
        except CorruptCheckpointError:
            pass
    rem: dict[int, Manifest | None] = {}
    if store is not None:
        for s in store.committed():
            try:
                rem[s] = loc[s] if s in loc else store.read_manifest(s)
            except (RemoteError, CorruptCheckpointError):
                rem[s] = None
    return loc, rem


def _names(local: LocalDir, store: RemoteStore | None) -> list[str]:
    """Names of the named lineages (``Checkpointer(name=)``) beside this one, local or remote."""
    found = {p.name for p in local.root.glob(f"{LINEAGE_PREFIX}*") if (p / LINEAGE_MARKER).is_file()}
    if store is not None:
        def top() -> list:
            store.fs.invalidate_cache()
            try:
                return store.fs.ls(store.root, detail=False)
            except FileNotFoundError:
                return []
        found |= {str(x).rstrip("/").rsplit("/", 1)[-1] for x in store._call("listing", top)}
    return sorted(n[len(LINEAGE_PREFIX):] for n in found if n.startswith(LINEAGE_PREFIX))


# -- ls ----------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    cfg, local, store = _setup(args)
    now = time.time()
    loc, rem = _manifests(local, store)
    rows = []
    for s in sorted(set(loc) | set(rem), reverse=True):
        m = loc.get(s) or rem.get(s)
        rows.append({"step": s, "bytes": m.total_bytes if m else None, "created": m.created if m else None,
                     "local": s in loc, "remote": s in rem, "durable": s in rem})
    lf = local_freeform(local.root)
    rf = remote_freeform(store) if store is not None else {}
    files = [{"path": p, "bytes": lf.get(p, rf.get(p)), "local": p in lf, "remote": p in rf,
              "durable": p in rf and (p not in lf or rf[p] == lf[p])} for p in sorted(set(lf) | set(rf))]
    names = _names(local, store) if getattr(args, "name", None) is None else []
    doc = {"local_dir": str(cfg.local_dir), "remote": cfg.remote, "checkpoints": rows, "files": files,
           "names": names}
    yn = {True: "yes", False: "no"}
    lines = [f"local dir: {cfg.local_dir}", f"remote:    {cfg.remote or '(none)'}"]
    if rows:
        lines.append(f"{'STEP':>12}  {'SIZE':>9}  {'AGE':>6}  LOCAL  REMOTE  DURABLE")
        for r in rows:
            lines.append(f"{r['step']:>12}  {human_bytes(r['bytes'] or 0):>9}  {_age(r['created'], now):>6}  "
                         f"{yn[r['local']]:<5}  {yn[r['remote']]:<6}  {yn[r['durable']]}")
    else:
        lines.append("no committed checkpoints")
    if files:
        lines.append(f"{'FILE':<32}  {'SIZE':>9}  LOCAL  REMOTE  DURABLE")
        for f in files:
            lines.append(f"{f['path']:<32}  {human_bytes(f['bytes'] or 0):>9}  {yn[f['local']]:<5}  "
                         f"{yn[f['remote']]:<6}  {yn[f['durable']]}")
    if names:
        lines.append(f"named checkpointers here (see each with --name NAME): {', '.join(names)}")
    _emit(args, doc, lines)
    return 0


# -- verify --------------------------------------------------------------------------------
def _verify_remote(store: RemoteStore, step: int, m: Manifest, quick: bool) -> str | None:
    from spotckpt._remote import generation_of, payload_dir

    d = payload_dir(step, generation_of(m))
    listing = {k: v for k, v in store.find().items() if k.startswith(d + "/")} if quick else None
    for e in m.files:
        rel = f"{d}/{e.path}"
        if listing is not None:
            if listing.get(rel) != e.size:
                return f"{rel}: size {listing.get(rel)} on the remote, manifest says {e.size}"
            continue
        err = _verify_object(store, rel, e.size, e.digest, e.algo)
        if err is not None:
            return f"{rel}: {err.replace('the set', 'manifest')}"
    return None


def _verify_object(store: RemoteStore, key: str, size: int, digest: str | None,
                   algo: str = "xxh3_128") -> str | None:
    """An object's size (and checksum unless ``digest`` is None), or what is wrong."""
    if digest is None:
        try:
            got = store.size(key)
        except RemoteError:
            return _MISSING
        return None if got == size else f"size {got} on the remote, the set says {size}"
    h, n = hasher(algo), 0
    try:
        with store.fs.open(store.path(key), "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
                n += len(chunk)
    except FileNotFoundError:
        return _MISSING
    if n != size:
        return f"{n} bytes on the remote, the set says {size}"
    return None if h.hexdigest() == digest else "fails its checksum on the remote"


_MISSING = "missing on the remote"


def _verify_set(store: RemoteStore, fs: FileSet | None, quick: bool) -> list[dict]:
    """One result per file of file set ``fs``."""
    out = []
    for e in (fs.entries.values() if fs is not None else ()):
        if e.link is not None:
            continue
        err = None
        try:
            err = _verify_object(store, e.key, e.size, None if quick else e.xxh3)
        except CorruptCheckpointError as x:
            err = str(x)
        out.append({"where": "remote", "file": e.path, "file_set": fs.seq, "ok": err is None,
                    "error": None if err is None else f"{e.path}: {err}"})
    return out


def _newest_set(store: RemoteStore) -> tuple[FileSet | None, list[dict]]:
    """The newest file set that parses, and one result for each newer one that does not
    (what a start quarantines: a verdict of damage, as for a step manifest)."""
    damaged: list[dict] = []

    def bad(rel: str, data: bytes, e: CorruptCheckpointError) -> None:
        damaged.append({"where": "remote", "file": rel, "file_set": int(rel[len("files/SET-"):][:12]),
                        "ok": False, "error": f"{rel}: the file set does not parse: {e}"})
    return newest_set(store, on_invalid=bad), damaged


def cmd_verify(args: argparse.Namespace) -> int:
    cfg, local, store = _setup(args)
    results = []
    if not args.remote_only:
        for s in local.committed():
            try:
                verify_dir(local.path(s), local.read_manifest(s))
                results.append({"where": "local", "step": s, "ok": True, "error": None})
            except CorruptCheckpointError as e:
                results.append({"where": "local", "step": s, "ok": False, "error": str(e)})
    if store is not None and not args.local_only:
        for s in store.committed():
            try:
                err = _verify_remote(store, s, store.read_manifest(s), args.quick)
            except CorruptCheckpointError as e:
                err = str(e)
            results.append({"where": "remote", "step": s, "ok": err is None, "error": err})
        fs, damaged = _newest_set(store)
        checked = _verify_set(store, fs, args.quick)
        if any(r["error"] and r["error"].endswith(_MISSING) for r in checked):
            # the job may have committed a newer set and deleted this one's objects meanwhile
            newer, again = _newest_set(store)
            if newer is not None and fs is not None and newer.seq != fs.seq:
                checked, damaged = _verify_set(store, newer, args.quick), again
        results += damaged + checked
    bad = [r for r in results if not r["ok"]]
    lines = [f"{r['where']:<6} " + (f"step {r['step']:>12}  " if "step" in r else f"file {r['file']}  ")
             + ("ok" if r["ok"] else f"DAMAGED: {r['error']}")
             for r in results] or ["no committed checkpoints to verify"]
    if bad:
        lines.append(f"{len(bad)} damaged checkpoint(s), file set(s) or file(s); a restore skips (and "
                     "quarantines) a damaged checkpoint or file set and falls back to the next older one, "
                     "and refuses a damaged file (a whole directory checkpoint) with an error line")
    _emit(args, {"ok": not bad, "checked": results}, lines)
    return 1 if bad else 0


__all__ = ["cmd_ls", "cmd_verify"]
