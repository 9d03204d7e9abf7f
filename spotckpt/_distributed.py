"""torch.distributed support: one agreement per step boundary, bounded waits.

A notice may reach one rank only (SIGTERM to one process, a metadata notice on one host).
At every step boundary the ranks agree on a few flags with one small all-reduce (MAX) over a
CPU (gloo) group of our own, so every rank saves and stops at the same step. The group has
a timeout: if a rank dies, the others get a clear error instead of hanging.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from typing import Any, Sequence

from ._errors import SpotckptError

DEFAULT_TIMEOUT = 1800.0  # seconds; a step boundary waits for the slowest rank's step


class RankLostError(SpotckptError, TimeoutError):
    """Another rank did not reach the agreement point in time (it died or hangs)."""


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    group: Any
    timeout: float

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


def detect() -> Dist | None:
    """A :class:`Dist` when torch.distributed is initialised with more than one rank."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    timeout = float(os.environ.get("SPOTCKPT_DIST_TIMEOUT") or DEFAULT_TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    return Dist(dist.get_rank(), dist.get_world_size(), group, timeout)


def restore(d: Dist, local: Any, store: Any, *, events: Any = None) -> tuple[int, Any, bool] | None:
    """Restore the same step on every rank: rank 0 lists the committed checkpoints, every
    rank fetches and verifies its own part, and a step is used only if all ranks succeeded.

    Returns:
        ``(step, this rank's part manifest, True)``, or None for a fresh start.
    """
    from ._engine import restore_part
    from ._errors import CorruptCheckpointError
    from ._events import log

    candidates = d.broadcast(store.committed() if d.rank == 0 else None, where="restore")
    for step in reversed(candidates):
        manifest = None
        try:
            manifest = restore_part(local, store, step, d.rank, d.world_size, events=events)
        except CorruptCheckpointError as e:
            log.warning("%s; trying an older checkpoint", e)
        failed = d.agree_max([manifest is None], where=f"restore of step {step}")[0]
        if not failed:
            return step, manifest, True
    return None
