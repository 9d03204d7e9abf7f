"""A JSON-lines events log (saves, uploads, notices, restores), the ``spotckpt`` logger, and
:func:`redact`, through which every line of both goes (no credential in a log)."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger("spotckpt")

_SECRET_RE = re.compile(
    r"(?i)((?:X-Amz-(?:Signature|Credential|Security-Token))|Signature|AWSAccessKeyId|"
    r"aws_secret_access_key|aws_session_token|secret(?:_access)?_key|password|token)"
    r"([=:]\s*)([^&\s'\",]+)")


_USERINFO_RE = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def redact(text: str) -> str:
    """Hide credentials and presigned-URL signatures in ``text``."""
    text = _SECRET_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted>", text)
    text = _USERINFO_RE.sub("<redacted>@", text)  # https://user:password@host/
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        secret = os.environ.get(var)
        if secret and len(secret) >= 8:  # as it is, and as it appears in a URL's query
            text = text.replace(secret, "<redacted>").replace(quote(secret, safe=""), "<redacted>")
    return text


class _RedactFilter(logging.Filter):
    """Every record of the ``spotckpt`` logger goes out through :func:`redact`, so no log
    line of ours can carry a credential or a presigned URL, whatever exception it quotes."""

    def filter(self, record: logging.LogRecord) -> bool:
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
