"""Cloud metadata notice sources: EC2 (IMDSv2), GCP and Azure Scheduled Events.

Each source runs in one daemon thread (:class:`MetadataWatcher`) and posts to the same
:class:`~spotckpt._notices.NoticeBoard` as the signal handler. They never block training,
and cost nothing where they do not apply: a source is polled only when the machine says it
is on that cloud (DMI data in ``/sys/class/dmi/id``, read locally, no network) or when its
endpoint is configured explicitly. A source whose endpoint does not answer its first
request is dropped.

Configuration (environment):

- ``SPOTCKPT_METADATA``: ``auto`` (default), ``off``, or a list such as ``ec2,gcp``.
- ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (the AWS SDKs' variable; ``AWS_EC2_METADATA_DISABLED=true``
  turns EC2 off), ``GCE_METADATA_HOST`` (google-auth's), ``SPOTCKPT_AZURE_METADATA_ENDPOINT``.
- ``SPOTCKPT_METADATA_INTERVAL``: seconds between polls (default 5).

Deadlines are kept on the monotonic clock, measured from when the notice was first seen
(see :func:`notice_deadline`): a notice's own time (EC2's ``time``, Azure's ``NotBefore``)
is read with the local wall clock, which may be off by minutes, so it is used only inside
the platform's documented grace.
"""
from __future__ import annotations

import email.utils
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

from ._board import NoticeBoard

log = logging.getLogger("spotckpt")

EC2_DEFAULT = "http://169.254.169.254"
GCP_DEFAULT = "http://metadata.google.internal"
AZURE_DEFAULT = "http://169.254.169.254"
EC2_GRACE = 120.0     # EC2 spot interruption: two minutes from the notice to the stop
GCP_GRACE = 30.0      # GCP preemption: 30 s from the notice to the stop
AZURE_GRACE = {"Preempt": 30.0}  # Azure Scheduled Events: the notice of each event type we act on
MIN_LEFT = 5.0        # a notice's own time is never taken to leave less than this
_SKEW_TOLERANCE = 2.0  # a notice's time this close to the bounds is used silently (1 s resolution)
_TIMEOUT = 1.0


def _http(method: str, url: str, headers: Mapping[str, str], timeout: float = _TIMEOUT) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - fixed schemes
            return r.status, r.read(65536)
    except urllib.error.HTTPError as e:
        return e.code, b""


def notice_deadline(wall: float | None, *, grace: float, now_wall: float, seen: float,
                    since: float | None = None) -> tuple[float, str | None]:
    """The monotonic deadline of a stop notice first seen at monotonic time ``seen``.

    The platform stops the machine ``grace`` seconds after it issues the notice, and the
    notice was issued after the last poll that did not find it (monotonic ``since``; without
    one, no earlier than ``seen`` is known): so the deadline is at most ``since + grace``,
    whatever the clocks say. The notice's own time ``wall`` (wall clock, as served) is used
    within ``[seen + MIN_LEFT, since + grace]``; a time in the past by the local clock, or
    missing, means the platform's grace from ``since``.

    Returns:
        ``(deadline, why)``: ``why`` is None when the notice's time was used as it is, else
        one line saying what was used instead (for the log).

    Example:
        >>> notice_deadline(1_000_000 - 30.0, grace=120, now_wall=1_000_000, seen=50.0)[0]  # skewed
        170.0
        >>> notice_deadline(1_000_000 + 90.0, grace=120, now_wall=1_000_000, seen=50.0)
        (140.0, None)
    """
    start = seen if since is None else min(since, seen)
    latest = start + grace
    if wall is None:
        return latest, None  # no time in the notice: the documented grace is all there is
    left = wall - now_wall
    if left <= 0:
        return latest, (f"its time is {-left:.0f} s in the past by the local clock (clock skew?): "
                        f"using the platform's {grace:.0f} s grace")
    d = min(max(seen + left, seen + min(MIN_LEFT, grace)), latest)
    if abs(d - (seen + left)) <= _SKEW_TOLERANCE:
        return d, None
    if d == latest:
        return d, (f"its time is {left:.0f} s away by the local clock, more than the platform's "
                   f"{grace:.0f} s grace (clock skew?): using {d - seen:.0f} s")
    return d, f"its time is only {left:.1f} s away by the local clock: using {d - seen:.0f} s"


def _dmi(name: str, root: Path = Path("/sys/class/dmi/id")) -> str:
    try:
        return (root / name).read_text().strip()
    except OSError:
        return ""


class Source:
    """One metadata endpoint. ``check()`` returns ``(kind, what, wall_deadline)`` tuples, where
    kind is ``"stop"`` or ``"advise"`` and ``wall_deadline`` is the notice's own time of the
    stop (wall clock) or None; it raises OSError when the endpoint is unreachable. ``grace``:
    the platform's documented seconds from a stop notice to the stop."""

    name = "?"
    grace = 30.0

    def check(self) -> list[tuple[str, str, float | None]]:
        raise NotImplementedError


class EC2Source(Source):
    """IMDSv2: PUT a session token, then GET ``spot/instance-action`` (a stop, with the
    time of the stop) and ``events/recommendations/rebalance`` (an early checkpoint)."""

    name = "ec2"
    grace = EC2_GRACE

    def __init__(self, endpoint: str = EC2_DEFAULT) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token: str | None = None
        self._token_expiry = 0.0
        self._rebalance_seen = False

    def _get(self, path: str) -> tuple[int, bytes]:
        if self._token is None or time.monotonic() > self._token_expiry:
            status, body = _http("PUT", f"{self.endpoint}/latest/api/token",
                                 {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            if status != 200:
                raise OSError(f"IMDSv2 token request answered {status}")
            self._token, self._token_expiry = body.decode().strip(), time.monotonic() + 21000
        status, body = _http("GET", f"{self.endpoint}/latest/meta-data/{path}",
                             {"X-aws-ec2-metadata-token": self._token})
        if status == 401:  # token expired early: fetch a new one next time
            self._token = None
        return status, body

    def check(self) -> list[tuple[str, str, float | None]]:
        out: list[tuple[str, str, float | None]] = []
        status, body = self._get("spot/instance-action")
        if status == 200:
            try:
                d = json.loads(body)
                when = datetime.strptime(d["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
                out.append(("stop", f"ec2-spot-{d.get('action', 'terminate')}", when.timestamp()))
            except (ValueError, KeyError, TypeError):
                out.append(("stop", "ec2-spot", None))  # no usable time: the two minutes
        if not self._rebalance_seen:
            status, body = self._get("events/recommendations/rebalance")
            if status == 200:
                self._rebalance_seen = True
                out.append(("advise", "ec2-rebalance", None))
        return out


class GCPSource(Source):
    """GCP: ``instance/preempted`` turns ``TRUE`` about 30 s before the stop."""

    name = "gcp"
    grace = GCP_GRACE

    def __init__(self, endpoint: str = GCP_DEFAULT) -> None:
        self.endpoint = endpoint.rstrip("/")

    def check(self) -> list[tuple[str, str, float | None]]:
        status, body = _http("GET", f"{self.endpoint}/computeMetadata/v1/instance/preempted",
                             {"Metadata-Flavor": "Google"})
        if status != 200:
            raise OSError(f"GCP metadata answered {status}")
        if body.strip().upper() == b"TRUE":
            return [("stop", "gcp-preempted", None)]  # no time given: 30 s from now
        return []


class AzureSource(Source):
    """Azure Scheduled Events: a ``Preempt`` event; the deadline is its ``NotBefore``."""

    name = "azure"
    grace = AZURE_GRACE["Preempt"]

    def __init__(self, endpoint: str = AZURE_DEFAULT) -> None:
        self.endpoint = endpoint.rstrip("/")

    def check(self) -> list[tuple[str, str, float | None]]:
        status, body = _http("GET", f"{self.endpoint}/metadata/scheduledevents?api-version=2020-07-01",
                             {"Metadata": "true"})
        if status != 200:
            raise OSError(f"Azure Scheduled Events answered {status}")
        out: list[tuple[str, str, float | None]] = []
        for ev in json.loads(body).get("Events", []) or []:
            if ev.get("EventType") not in AZURE_GRACE:
                continue
            try:
                when: float | None = email.utils.parsedate_to_datetime(ev["NotBefore"]).timestamp()
            except (KeyError, TypeError, ValueError):
                when = None
            out.append(("stop", "azure-preempt", when))
        return out


def sources_from_env(env: Mapping[str, str] | None = None,
                     dmi: Callable[[str], str] = _dmi) -> list[Source]:
    """The sources that apply here, per the module docstring's rules."""
    env = os.environ if env is None else env
    mode = (env.get("SPOTCKPT_METADATA") or "auto").strip().lower()
    if mode in ("off", "0", "false", "none", "no"):
        return []
    forced = set() if mode == "auto" else {m.strip() for m in mode.split(",") if m.strip()}
    vendor, product = dmi("sys_vendor"), dmi("product_name")
    out: list[Source] = []
    ec2_ep = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    if ("ec2" in forced or env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true") and (
            "ec2" in forced or ec2_ep or (not forced and (vendor == "Amazon EC2" or dmi("board_asset_tag").startswith("i-")))):
        out.append(EC2Source(ec2_ep or EC2_DEFAULT))
    gcp_host = env.get("GCE_METADATA_HOST")
    if "gcp" in forced or gcp_host or (not forced and "Google" in product):
        ep = gcp_host if gcp_host and "://" in gcp_host else f"http://{gcp_host}" if gcp_host else GCP_DEFAULT
        out.append(GCPSource(ep))
    az_ep = env.get("SPOTCKPT_AZURE_METADATA_ENDPOINT")
    if "azure" in forced or az_ep or (not forced and vendor == "Microsoft Corporation"
                                       and dmi("chassis_asset_tag") == "7783-7084-3265-9085-8269-3286-77"):
        out.append(AzureSource(az_ep or AZURE_DEFAULT))
    return out


class MetadataWatcher:
    """Polls the sources in one daemon thread and posts their notices.

    Args:
        board: where stop notices go.
        on_advise: called (from the watcher thread) with the source name of an advisory,
            e.g. an EC2 rebalance recommendation; it should only record it.
        interval: seconds between polls.
    """

    def __init__(self, board: NoticeBoard, sources: list[Source], *, on_advise: Callable[[str], None],
                 interval: float = 5.0) -> None:
        self.board, self.sources, self.on_advise, self.interval = board, sources, on_advise, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active: list[str] = []

    def start(self) -> None:
        if self.sources:
            self._thread = threading.Thread(target=self._run, name="spotckpt-metadata", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        live = list(self.sources)
        first = True
        quiet: dict[str, float] = {}  # source -> when its last poll that found no stop began
        posted: set[tuple[str, str]] = set()
        while live and not self._stop.is_set():
            for src in list(live):
                asked = self.board.clock()
                try:
                    found = src.check()
                except (OSError, ValueError) as e:
                    if first:  # the endpoint is not there: never ask again
                        live.remove(src)
                        log.debug("spotckpt: metadata source %s not available (%s)", src.name, e)
                    continue
                if first:
                    self.active.append(src.name)
                if not any(kind == "stop" for kind, _, _ in found):
                    quiet[src.name] = asked
                for kind, what, wall in found:
                    if kind != "stop":
                        self.on_advise(what)
                    elif (src.name, what) not in posted:
                        # once per notice, from when it was first seen: later polls (and a
                        # wall clock that steps meanwhile) do not move the deadline
                        posted.add((src.name, what))
                        deadline, why = notice_deadline(wall, grace=src.grace, now_wall=time.time(),
                                                        seen=self.board.clock(), since=quiet.get(src.name))
                        if why:
                            log.warning("spotckpt: %s notice: %s", what, why)
                        self.board.post_deadline(what, deadline)
            first = False
            self._stop.wait(self.interval)
