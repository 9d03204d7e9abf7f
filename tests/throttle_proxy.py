"""A TCP proxy on loopback that limits the client-to-server byte rate (a slow upload path)."""
from __future__ import annotations

import socket
import threading
import time


class ThrottleProxy:
    """Forward 127.0.0.1:<port> to ``upstream``; uploads share one ``up_bps`` budget."""

    def __init__(self, upstream: tuple[str, int], up_bps: float) -> None:
        self.upstream, self.up_bps = upstream, up_bps
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self.sent = 0  # bytes forwarded upstream so far (a test can wait for an upload's progress)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _throttle(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.up_bps
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            self.sent += n

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upload: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                if upload:
                    self._throttle(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
