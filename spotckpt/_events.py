"""A JSON-lines events log (saves, uploads, notices, restores) plus the ``spotckpt`` logger."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("spotckpt")


class _RedactFilter(logging.Filter):
    """Every record of the ``spotckpt`` logger goes out through :func:`redact`, so no log
    line of ours can carry a credential or a presigned URL, whatever exception it quotes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ._store import redact

        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


log.addFilter(_RedactFilter())


class EventLog:
    """Append-only ``events.jsonl``; each line ``{"ts":..., "event":..., ...}``.

    Example:
        >>> EventLog(Path("/tmp/events.jsonl")).emit("save", step=100)  # doctest: +SKIP
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        from ._store import redact

        rec = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid(), **fields}
        line = redact(json.dumps(rec, default=str, sort_keys=True))
        log.debug("%s", line)
        if self.path is None:
            return
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(line + "\n")
            except OSError:  # the log must never break training
                pass
