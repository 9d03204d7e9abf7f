"""The supervisor's part in the job's incarnation history (``every="auto"``).

Process layer. ``spotckpt run`` holds the job's generation, so it keeps this incarnation's
record in the remote's ``history.json`` (:mod:`spotckpt._remote._history`): it begins the
record after its claim and pull, beats after each durable checkpoint (the Syncer), and
records how the incarnation ended: ``completed`` (exit 0, no notice), ``error`` (another
status), ``notice-saved`` (a notice, and the final flush made everything durable before the
deadline without killing the command), ``notice-late`` (otherwise). A supervisor that is
killed says nothing: the next start records ``hard-kill``. It leaves a copy for its command
in the state dir (``history.json``: the earlier incarnations' totals and the measured
upload rate), which a Checkpointer with ``every="auto"`` reads instead of the remote; the
command's decision (``schedule.json`` in the state dir) goes into each beat.
"""
from __future__ import annotations

import json
from typing import Any

from spotckpt._commit import LocalDir, write_atomic
from spotckpt._events import EventLog, log
from spotckpt._remote import Fence, Recorder, RemoteStore
from spotckpt._sync import Syncer

COPY = "history.json"        # the copy for the command, in the state dir
DECISION = "schedule.json"   # the command's decision, written by its Checkpointer


def _read_decision(local: LocalDir) -> dict[str, Any] | None:
    try:
        d = json.loads((local.meta / DECISION).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def begin(store: RemoteStore, fence: Fence, syncer: Syncer, local: LocalDir, events: EventLog) -> Recorder | None:
    """Begin this incarnation's record; None (one warning line) if the history cannot be read."""
    try:
        rec = Recorder.begin(store, fence, by="supervisor")
    except Exception as e:  # noqa: BLE001 - advice only: the job runs without it
        log.warning("spotckpt run: the job's history could not be read (%s); every='auto' uses its prior",
                    str(e).splitlines()[0][:200])
        return None
    rec.decision = lambda: _read_decision(local)

    def copy() -> None:
        rate = syncer.bytes_uploaded / syncer.upload_seconds if syncer.upload_seconds > 0.05 else None
        try:
            write_atomic(local.meta / COPY, json.dumps(rec.local_copy(upload_bytes_per_s=rate)).encode(),
                         sync=False)
        except OSError:
            pass
    rec.after_beat = copy
    copy()
    events.emit("history_begin", generation=fence.generation, **rec.summary)
    syncer.history = rec
    return rec


def ending(*, rc: int | None, notice: bool, flushed: bool, killed: bool) -> str:
    """How this incarnation ended, from the supervisor's view."""
    if notice:
        return "notice-saved" if flushed and not killed else "notice-late"
    return "completed" if rc == 0 else "error"


__all__ = ["COPY", "begin", "ending"]
