"""torch.distributed support: one agreement per step boundary, bounded waits, world sizes.

A notice may reach one rank only (SIGTERM to one process, a metadata notice on one host).
At every step boundary the ranks agree on a few flags with one small all-reduce (MAX) over a
CPU (gloo) group of our own, so every rank saves and stops at the same step. The group has
a timeout: if a rank dies, the others get a clear error instead of hanging.

A checkpoint resumes a job of another world size only when it is sharded (written through
DCP, ``_state/_dcp.py``) and the job's state is sharded too; otherwise the job stops at once with a
:class:`WorldSizeError` naming both sizes, never a fresh start beside the old checkpoints.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from spotckpt._commit import Manifest
from spotckpt._errors import CorruptCheckpointError, SpotckptError, WorldSizeError
from spotckpt._events import log

DEFAULT_TIMEOUT = 1800.0  # seconds; a step boundary waits for the slowest rank's step


class RankLostError(SpotckptError, TimeoutError):
    """Another rank did not reach the agreement point in time (it died or hangs)."""


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    group: Any
    timeout: float
    sharded: list[str] = dataclasses.field(default_factory=list)  # state keys saved through DCP
    io_group: Any = None  # DCP's collectives in the writer thread (None unless sharded)

    def agree_max(self, values: Sequence[float], *, where: str) -> list[float]:
        """Element-wise MAX of ``values`` over all ranks.

        Raises:
            RankLostError: a rank did not answer within the timeout.
        """
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as e:
            raise RankLostError(
                f"spotckpt: rank {self.rank}: no answer from the other ranks at {where} within "
                f"{self.timeout:.0f} s (did a rank die?); set SPOTCKPT_DIST_TIMEOUT to wait longer"
            ) from e
        return t.tolist()

    def broadcast(self, obj: Any, *, where: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as e:
            raise RankLostError(f"spotckpt: rank {self.rank}: no answer from rank 0 at {where} "
                                f"within {self.timeout:.0f} s (did a rank die?)") from e
        return box[0]


def detect(state: Any = None) -> Dist | None:
    """A :class:`Dist` when torch.distributed is initialised with more than one rank, or with
    one rank and a sharded ``state`` (so that its checkpoints have the multi-rank layout DCP
    reshards from and to)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    keys: list[str] = []
    if "torch.distributed.tensor" in sys.modules:  # else no DTensor exists (and DDP pays no import)
        from spotckpt._state import sharded_keys

        keys = sharded_keys(state or {})
    if dist.get_world_size() < 2 and not keys:
        return None
    timeout = float(os.environ.get("SPOTCKPT_DIST_TIMEOUT") or DEFAULT_TIMEOUT)
    delta = datetime.timedelta(seconds=timeout)
    group = dist.new_group(backend="gloo", timeout=delta)
    io_group = dist.new_group(backend="gloo", timeout=delta) if keys else None
    return Dist(dist.get_rank(), dist.get_world_size(), group, timeout, keys, io_group)


def release(d: Dist | None, *holders: Any) -> None:
    """At close: destroy the process groups :func:`detect` created and drop every reference
    to them (``d``'s, and the ``group`` of each of ``holders``, e.g. the DCP codec).

    The last reference going makes the C++ ``ProcessGroupGloo`` join its worker threads
    here, while the interpreter is whole. Left to the interpreter's exit, a worker that
    still releases a collective's tensors needs the GIL of a finalizing interpreter, which
    ends the thread with ``pthread_exit`` inside a C++ destructor: ``std::terminate``,
    SIGABRT after a run that succeeded. (``destroy_process_group`` alone does not stop a
    gloo group's threads.) Call it once no thread of spotckpt runs a collective."""
    if d is None:
        return
    groups = [g for g in (d.group, d.io_group) if g is not None]
    d.group = d.io_group = None
    for h in holders:
        if getattr(h, "group", None) is not None and any(h.group is g for g in groups):
            h.group = None
    if not groups:
        return
    import torch.distributed as dist

    for g in groups:
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group(g)  # unregistered: torch holds it no more
            except (ValueError, RuntimeError, KeyError):
                pass  # already destroyed (the script destroyed everything first)
    del g, groups  # the last references: each group's destructor joins its worker threads


def codec(state: dict[str, Any], d: Dist | None) -> Any:
    """How ``state`` is snapshotted and written: DCP when it is sharded, else one file."""
    from spotckpt._state import PlainCodec

    if d is None or not d.sharded:
        return PlainCodec(state)
    from spotckpt._state import ShardedCodec  # torch.distributed.checkpoint: only for sharded states

    return ShardedCodec(state, d.sharded, group=d.io_group)


# -- world sizes -------------------------------------------------------------------------------
def is_ranked(m: Manifest) -> bool:
    """Whether ``m`` is a multi-rank checkpoint (every file in a ``rank-<R>/`` part)."""
    return bool(m.files) and all(f.path.startswith("rank-") for f in m.files)


def check_world(m: Manifest, *, where: str, d: Dist | None) -> None:
    """Stop with a clear error if checkpoint ``m`` cannot resume this job (``d``: its ranks).

    Raises:
        WorldSizeError: naming the checkpoint's world size and this job's.
    """
    saved_ranked = is_ranked(m)
    check_saved_world(m.step, m.world_size if saved_ranked else 1, saved_ranked, m.serializer, where=where, d=d)


def check_saved_world(step: int, saved: int, saved_ranked: bool, serializer: str, *, where: str,
                      d: Dist | None) -> None:
    """:func:`check_world` from what a checkpoint's manifest says: its ``step``, world size
    ``saved``, whether it has the multi-rank layout, its ``serializer``."""
    ranked, world = d is not None, 1 if d is None else d.world_size
    if saved_ranked == ranked and saved == world:
        return
    sharded = serializer == "dcp"
    if saved_ranked and ranked and sharded and d is not None and d.sharded:
        return  # DCP reshards it
    was = f"{saved} rank(s) (torch.distributed)" if saved_ranked else "1 process"
    now = f"{world} rank(s)" if ranked else "1 process"
    why = ("It is sharded (DCP): a job whose state holds the sharded model (FSDP2 fully_shard, "
           "DTensor) resumes it at any world size." if sharded else
           "Its state is per rank (state.pt) and cannot be resharded.")
    raise WorldSizeError(
        f"spotckpt: the newest checkpoint, step {step} ({where}), was written by {was}; this job "
        f"has {now}. {why} Start the job with {saved} rank(s) (torchrun --nproc-per-node {saved}), "
        "or give it another local_dir/remote to start fresh")


def check_local(root: Path, d: Dist | None) -> None:
    """Without a remote: the newest checkpoint in ``root`` (one process: ``step-N/``; ranks:
    ``shared/step-N/``) must suit this job, else :class:`WorldSizeError`."""
    from spotckpt._commit import LocalDir

    found = []
    for sub, ranked in ((root, False), (root / "shared", True)):
        steps = LocalDir(sub, state=sub).committed()  # reads only
        if steps:
            found.append((steps[-1], ranked == (d is not None), sub))
    if not found:
        return
    step, _, sub = max(found, key=lambda f: f[:2])
    try:
        m = LocalDir(sub, state=sub).read_manifest(step)
    except CorruptCheckpointError:
        return  # restore falls back past it
    check_world(m, where=f"in {sub}", d=d)


def _read(store: Any, step: int) -> Manifest | None:
    try:
        return store.read_manifest(step)
    except CorruptCheckpointError as e:
        log.warning("%s; trying an older checkpoint", e)
        return None


def restore(d: Dist, local: Any, store: Any, state: dict[str, Any] | None, *,
            events: Any = None, accept: Any = None) -> tuple[int, Any, bool] | None:
    """Restore the same step on every rank and load it into ``state``: rank 0 lists the
    committed checkpoints, every rank fetches and verifies its own part (a sharded step:
    every rank's part, for DCP), and a step is used only if all ranks succeeded.

    ``state`` None: a job that commits directories; the step is restored, not loaded.
    ``accept``: called with the combined manifest; raises to stop.

    Returns:
        ``(step, manifest, True)``, or None for a fresh start.

    Raises:
        WorldSizeError: the newest checkpoint has another world size and is not resharded.
    """
    import shutil

    from spotckpt._events import redact
    from spotckpt._remote import order  # newest generation first, then newest step
    from spotckpt._state import _snapshot as _state
    from spotckpt._sync import fetch_all, restore_part

    candidates = d.broadcast(order(store, store.committed(), store.read_manifest)[::-1] if d.rank == 0 else None,
                             where="restore")
    for step in reversed(candidates):
        combined = d.broadcast(_read(store, step) if d.rank == 0 else None, where=f"restore of step {step}")
        if combined is None:
            continue
        check_world(combined, where=redact(store.url), d=d)  # the same manifest: every rank decides alike
        if accept is not None:
            accept(combined)
        manifest = tree = None
        try:
            if combined.serializer == "dcp":
                tree = fetch_all(local, store, step, combined, events=events, rank=d.rank)
            else:
                manifest = restore_part(local, store, step, d.rank, d.world_size, events=events)
        except CorruptCheckpointError as e:
            log.warning("%s; trying an older checkpoint", e)
        failed = d.agree_max([manifest is None and tree is None], where=f"restore of step {step}")[0]
        if failed:
            if tree is not None:
                shutil.rmtree(tree, ignore_errors=True)
            continue
        if tree is not None:
            from spotckpt._state import _dcp

            try:
                missing = _dcp.load(state, tree, d.rank, combined.world_size, group=d.group)
            finally:
                shutil.rmtree(tree, ignore_errors=True)
            if combined.world_size != d.world_size:
                log.warning("spotckpt: step %d was written by %d rank(s); resharded to %d", step,
                            combined.world_size, d.world_size)
            manifest = combined
        elif state is None:
            missing = []  # a committed directory: the caller uses it as it is
        else:
            missing = _state.apply(state, _state.read_state(local.path(step), manifest.serializer))
        if missing:
            log.warning("spotckpt: checkpoint step %d has no entry for %s; left as is", step, missing)
        return step, manifest, True
    return None
