"""Local HTTP servers that speak the cloud metadata protocols, for notice tests.

- EC2 IMDSv2: ``PUT /latest/api/token`` issues a token; metadata GETs without it get 401.
  ``spot/instance-action`` is 404 until :meth:`arm_spot`; ``events/recommendations/rebalance``
  is 404 until :meth:`arm_rebalance`.
- GCP: ``/computeMetadata/v1/instance/preempted`` answers FALSE/TRUE, requires
  ``Metadata-Flavor: Google``.
- Azure: ``/metadata/scheduledevents`` lists a ``Preempt`` event once armed, requires
  ``Metadata: true``.

``skew``: seconds the client's wall clock is ahead of the platform's. The times the server
serves (EC2 ``time``, Azure ``NotBefore``) are shifted by ``-skew``, as a client whose clock
is that far off reads them (150: the client's clock is 2.5 minutes fast).
"""
from __future__ import annotations

import email.utils
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MetadataServer:
    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.spot_at: float | None = None      # wall time of the stop
        self.rebalance = False
        self.gcp_preempted = False
        self.azure_not_before: float | None = None
        self.skew = 0.0
        self.requests: list[tuple[str, str]] = []
        self.unauthorized = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                outer.requests.append(("PUT", self.path))
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._send(200, outer.token.encode())
                else:
                    self._send(400)

            def do_GET(self) -> None:
                outer.requests.append(("GET", self.path))
                p = self.path
                if p.startswith("/latest/meta-data/"):
                    if self.headers.get("X-aws-ec2-metadata-token") != outer.token:
                        outer.unauthorized += 1
                        return self._send(401)
                    if p.endswith("/spot/instance-action") and outer.spot_at is not None:
                        t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(outer.spot_at - outer.skew))
                        return self._send(200, json.dumps({"action": "terminate", "time": t}).encode(),
                                          "application/json")
                    if p.endswith("/events/recommendations/rebalance") and outer.rebalance:
                        t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - outer.skew))
                        return self._send(200, json.dumps({"noticeTime": t}).encode(), "application/json")
                    return self._send(404)
                if p == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    return self._send(200, b"TRUE" if outer.gcp_preempted else b"FALSE")
                if p.startswith("/metadata/scheduledevents"):
                    if self.headers.get("Metadata") != "true":
                        return self._send(400)
                    events = []
                    if outer.azure_not_before is not None:
                        events.append({
                            "EventId": "A1", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                            "Resources": ["vm0"], "EventStatus": "Scheduled",
                            "NotBefore": email.utils.formatdate(outer.azure_not_before - outer.skew, usegmt=True),
                            "Description": "", "EventSource": "Platform", "DurationInSeconds": -1})
                    body = json.dumps({"DocumentIncarnation": len(events), "Events": events}).encode()
                    return self._send(200, body, "application/json")
                return self._send(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> MetadataServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
