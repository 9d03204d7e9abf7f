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


PAUSE_AT_ENV = "SPOTCKPT_TEST_PAUSE_AT"    # tests only: events to pause at (see _test_pause)
PAUSE_DIR_ENV = "SPOTCKPT_TEST_PAUSE_DIR"
_PAUSE_LIMIT = 300.0                       # seconds a paused process waits for its release at most


def _test_pause(role: str, event: str) -> None:
    """A test-only hook that makes a phase reachable without guessing at times: with
    ``SPOTCKPT_TEST_PAUSE_AT=EVENT[,ROLE:EVENT...]`` and ``SPOTCKPT_TEST_PAUSE_DIR=DIR``, the
    thread that writes ``EVENT`` (of an events log of ``ROLE``: ``supervisor``,
    ``checkpointer``) creates ``DIR/<entry>.<pid>.paused`` and waits until ``DIR/<entry>.go``
    exists. The test signals the process while it is there, then releases it. Unset: nothing."""
    at = os.environ.get(PAUSE_AT_ENV)
    if not at:
        return
    names = at.split(",")
    entry = f"{role}:{event}" if f"{role}:{event}" in names else event if event in names else None
    if entry is None:
        return
    d = Path(os.environ.get(PAUSE_DIR_ENV) or ".")
    go = d / f"{entry}.go"
    if go.exists():
        return  # released: later events of that name go on
    try:
        (d / f"{entry}.{os.getpid()}.paused").touch()
    except OSError:
        return
    end = time.monotonic() + _PAUSE_LIMIT
    while not go.exists() and time.monotonic() < end:
        time.sleep(0.01)


class EventLog:
    """Append-only ``events.jsonl``; each line ``{"ts":..., "event":..., ...}``.

    Args:
        role: who writes it (``supervisor``, ``checkpointer``): for the tests' pause hook only.

    Example:
        >>> EventLog(Path("/tmp/events.jsonl")).emit("save", step=100)  # doctest: +SKIP
    """

    role = ""

    def __init__(self, path: Path | None, *, role: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if role is not None:
            self.role = role

    def emit(self, event: str, **fields: Any) -> None:
        rec = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid(), **fields}
        line = redact(json.dumps(rec, default=str, sort_keys=True))
        log.debug("%s", line)
        if self.path is not None:
            with self._lock:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.path, "a") as f:
                        f.write(line + "\n")
                except OSError:  # the log must never break training
                    pass
        _test_pause(self.role, event)
