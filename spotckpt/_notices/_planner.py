"""The deadline-aware flush planner.

From the measured durations of recent saves and uploads it decides, when a notice arrives,
whether a new full save plus its upload fits before the deadline. If not, it finishes
uploading the newest committed checkpoint instead (losing the steps since then, but ending
with a durable checkpoint rather than a half-uploaded one).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from spotckpt._events import log

PLAN_ACTIONS = ("save", "finish-upload", "nothing")  # ordered from least to most careful
SAFETY = 1.25      # estimates are multiplied by this
OVERHEAD = 0.5     # seconds for manifests, listings and process exit


@dataclasses.dataclass(frozen=True)
class Plan:
    action: str                 # "save" | "finish-upload" | "nothing"
    estimate: float | None      # seconds for a full save + upload, if known
    seconds_left: float
    reason: str


class FlushPlanner:
    """Keeps the latest measurements; :meth:`decide` turns them into a :class:`Plan`.

    Example:
        >>> p = FlushPlanner(); p.record_save(0.1, 0.4, 10**9); p.record_upload(10**9, 8.0)
        >>> p.decide(5.0, unsaved_work=True, undurable_commit=True).action
        'finish-upload'
    """

    def __init__(self, *, uploads: bool = True) -> None:
        self.uploads = uploads
        self.snapshot_s: float | None = None
        self.write_s: float | None = None
        self.bytes: int | None = None
        self.bytes_per_s: float | None = None

    def record_save(self, snapshot_s: float, write_s: float, nbytes: int) -> None:
        self.snapshot_s, self.write_s, self.bytes = snapshot_s, write_s, nbytes

    def record_upload(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            bps = nbytes / seconds
            # smooth, but let a slowdown show quickly: the deadline cares about the worst case
            self.bytes_per_s = bps if self.bytes_per_s is None else min(bps, 0.5 * (bps + self.bytes_per_s))

    def upload_seconds(self, nbytes: int) -> float | None:
        return None if not self.bytes_per_s else nbytes / self.bytes_per_s

    def queued_seconds(self, syncer: Any) -> float:
        """Seconds the upload in flight on ``syncer`` (None: no remote) still needs, at the
        measured rate."""
        if syncer is None:
            return 0.0
        nbytes, since = syncer.in_flight()
        total = self.upload_seconds(nbytes) if nbytes else None
        return max(0.0, total - since) if total is not None else 0.0

    def estimate(self, *, queued_s: float = 0.0) -> float | None:
        """Seconds for a new full save until it is durable, or None before any measurement.

        Args:
            queued_s: seconds the upload already in flight still needs (a new upload waits
                for it).
        """
        if self.snapshot_s is None or self.write_s is None:
            return None
        t = self.snapshot_s + self.write_s + queued_s
        if self.uploads:
            if self.bytes_per_s is None or self.bytes is None:
                return None
            t += self.bytes / self.bytes_per_s
        return t * SAFETY + OVERHEAD

    def decide(self, seconds_left: float, *, unsaved_work: bool, undurable_commit: bool,
               queued_s: float = 0.0) -> Plan:
        est = self.estimate(queued_s=queued_s)
        if not unsaved_work:
            return Plan("finish-upload" if undurable_commit else "nothing", est, seconds_left,
                        "the current step is already saved")
        if est is None:
            return Plan("save", None, seconds_left, "no measurement yet: trying a full save")
        if est <= seconds_left:
            return Plan("save", est, seconds_left, f"a full save needs ~{est:.1f} s of {seconds_left:.1f} s")
        if undurable_commit:
            return Plan("finish-upload", est, seconds_left,
                        f"a full save needs ~{est:.1f} s but only {seconds_left:.1f} s are left: "
                        "finishing the upload of the newest committed checkpoint")
        return Plan("nothing", est, seconds_left,
                    f"a full save needs ~{est:.1f} s but only {seconds_left:.1f} s are left; "
                    "the newest durable checkpoint stays the resume point")


def finish_uploads(syncer: Any, action: str, budget: float, remote: str | None,
                   current: int | None = None) -> bool:
    """After an interruption save: wait up to ``budget`` seconds for what ``action`` promised
    (``finish-upload``: the upload in flight, or ``current``, the step at the notice when it
    is committed already; otherwise everything queued). Logs the durable step; False if the
    deadline came first."""
    if action == "finish-upload":
        busy = syncer.busy_steps()
        if current is not None and current in busy:
            # the current step is committed (a periodic save, commit_dir): that is the one
            # to make durable, not only an older one still in flight
            target: int | None = current
        else:
            # finish what is in flight; whatever is queued behind it would not fit
            target = syncer.uploading_step()
            if target is None and busy:
                target = max(busy)
        ok = target is None or syncer.wait_durable(target, budget)
    else:
        ok = syncer.flush(budget)
    durable = syncer.durable_step
    if ok:
        log.warning("spotckpt: step %s is durable at %s", durable, remote)
    else:
        log.error("spotckpt: uploads did NOT finish before the deadline (%s); durable step: %s",
                  syncer.last_error or "timeout", durable)
    return ok
