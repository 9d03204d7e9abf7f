"""A fault-injecting HTTP proxy for S3 tests, on 127.0.0.1 only.

It sits between an S3 client and an S3 server (moto, MinIO) and, on a chosen share of
requests, answers with a fault instead of (or after) passing the request on:

- ``500``: ``InternalError``; ``503``: ``SlowDown`` (the request never reaches the server);
- ``reset``: the connection is reset (TCP RST), before the request reaches the server or,
  half the time, after the server applied it (the client cannot tell which);
- ``stall``: nothing is sent for ``stall_seconds``, then the connection closes;
- ``truncate``: the server's answer with its full ``Content-Length`` but half the body, then
  the connection closes (on answers without a body: a reset after the server applied it);
- ``leak`` (only when asked for): a 403 whose message echoes the request's ``Authorization``
  header and ``leak_text`` (say, a presigned URL), as an over-helpful server might.

Example:
    >>> with FaultProxy("http://127.0.0.1:5000", rate=0.3) as proxy:  # doctest: +SKIP
    ...     store = RemoteStore(url, {"client_kwargs": {"endpoint_url": proxy.endpoint}})
"""
from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterable

KINDS = ("500", "503", "reset", "stall", "truncate")
LEAK = "leak"  # not drawn by default: 403 whose message echoes the request's credentials
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade",
        "content-length"}
_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        "<Message>{msg}</Message><RequestId>faultproxy</RequestId></Error>")


class FaultProxy:
    """Forward HTTP requests to ``upstream``, injecting faults into a share of them.

    Args:
        upstream: ``http://host:port`` of the real server.
        rate: share of requests (0..1) that get a fault.
        kinds: which faults to draw from (uniformly).
        stall_seconds: how long a ``stall`` holds the connection.
        match: only requests for which ``match(method, path)`` is true may get a fault.
        seed: for a reproducible fault sequence.

    Attributes:
        requests: requests seen; ``faults``: a Counter of faults injected by kind;
        log: ``(method, path, fault or "")`` for every request; spans: ``(method, path,
        start, end)`` (monotonic: the request's arrival, its answer written) for every request
        answered, to tell which requests waited on which (:func:`chain`).
    """

    def __init__(self, upstream: str, *, rate: float = 0.0, kinds: Iterable[str] = KINDS,
                 stall_seconds: float = 3.0, match: Callable[[str, str], bool] | None = None,
                 seed: int | None = None, leak_text: str = "") -> None:
        u = urllib.parse.urlsplit(upstream)
        self.up_host, self.up_port = u.hostname or "127.0.0.1", u.port or 80
        self.rate, self.kinds, self.stall_seconds, self.match = rate, tuple(kinds), stall_seconds, match
        for k in self.kinds:
            if k not in KINDS + (LEAK,):
                raise ValueError(f"unknown fault kind {k!r}")
        self.rng = random.Random(seed)
        self.leak_text = leak_text
        self.requests = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []
        self.spans: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:  # the socket was reset on purpose
                    pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # resets and stalls make client sockets fail: expected here

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def set(self, *, rate: float | None = None, kinds: Iterable[str] | None = None) -> None:
        """Change the fault share or kinds while running."""
        with self._lock:
            if rate is not None:
                self.rate = rate
            if kinds is not None:
                self.kinds = tuple(kinds)

    # -- one request -----------------------------------------------------------------------
    def _draw(self, method: str, path: str) -> str:
        with self._lock:
            self.requests += 1
            fault = ""
            if self.kinds and (self.match is None or self.match(method, path)) and self.rng.random() < self.rate:
                fault = self.rng.choice(self.kinds)
                if fault == "reset" and self.rng.random() < 0.5:
                    fault = "reset-after"
                self.faults[fault] += 1
            self.log.append((method, path, fault))
            return fault

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        t0 = time.monotonic()
        try:
            self._answer(h)
        finally:
            with self._lock:
                self.spans.append((h.command, h.path, t0, time.monotonic()))

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        fault = self._draw(h.command, h.path)
        if fault == LEAK:
            msg = f"Access Denied for {h.headers.get('Authorization', '')}; presigned: {self.leak_text}"
            data = _XML.format(code="AccessDenied", msg=msg.replace("&", "&amp;")).encode()
            h.send_response(403)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            return
        if fault in ("500", "503"):
            code, msg = (("InternalError", "We encountered an internal error. Please try again.")
                         if fault == "500" else ("SlowDown", "Please reduce your request rate."))
            data = _XML.format(code=code, msg=msg).encode()
            h.send_response(int(fault))
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            return
        if fault == "reset":
            return _reset(h)
        if fault == "stall":
            self._closing.wait(self.stall_seconds)
            h.close_connection = True
            return
        try:
            status, reason, headers, data = self._forward(h, body)
        except OSError:
            return _reset(h)
        if fault == "reset-after" or (fault == "truncate" and (h.command == "HEAD" or not data)):
            return _reset(h)
        h.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP:
                h.send_header(k, v)
        if h.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length")
            if length is not None:
                h.send_header("Content-Length", length)
        else:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            return _reset(h)
        h.wfile.write(data)

    def _forward(self, h: http.server.BaseHTTPRequestHandler, body: bytes) -> tuple[int, str, list, bytes]:
        conn = http.client.HTTPConnection(self.up_host, self.up_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n) if n else b""


def _reset(h: http.server.BaseHTTPRequestHandler) -> None:
    """Close the client connection with a TCP RST (SO_LINGER 0)."""
    h.close_connection = True
    try:
        h.wfile.flush()
    except OSError:
        pass
    try:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
    except OSError:
        pass


def chain(spans: list[tuple[str, str, float, float]], until: Callable[[str, str], bool]) -> list[str]:
    """The longest run of requests each sent after the one before it was answered, ending
    before the first request for which ``until(method, path)`` holds: the round trips that
    request waited through (requests in flight together count once). Raises if none matches."""
    spans = sorted(spans, key=lambda s: s[2])
    first = next(s for s in spans if until(s[0], s[1]))
    best: dict[int, list[str]] = {}
    for i, (m, p, t0, t1) in enumerate(spans):
        if t1 > first[2] or spans[i] is first:
            continue
        before = [best[j] for j, s in enumerate(spans[:i]) if j in best and s[3] <= t0]
        best[i] = max(before, key=len, default=[]) + [f"{m} {p}"]
    return max(best.values(), key=len, default=[])


def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False
