"""Interruption notices. Sources record a :class:`Notice`; they never save anything.

The signal handler follows Lightning's ``signal_connector``: it records the notice, chains
the handler it replaced, registers only on the main thread, and restores the original
handlers on close. The save happens later, at a step boundary, in ordinary code.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Notice:
    """An interruption is coming.

    Attributes:
        source: what announced it (``"SIGTERM"``, ``"ec2-spot"``, ...).
        received_at: ``time.monotonic()`` when it arrived.
        deadline: monotonic time by which state must be durable.
    """

    source: str
    received_at: float
    deadline: float

    def seconds_left(self, clock: Callable[[], float] = time.monotonic) -> float:
        return self.deadline - clock()


class NoticeBoard:
    """Holds the first (most urgent) notice; thread- and signal-safe to post to."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._notice: Notice | None = None
        self._event = threading.Event()
        self._advisories: list[str] = []
        self._lock = threading.Lock()  # advisories come from the watcher thread, not signals

    def post(self, source: str, grace_seconds: float) -> None:
        """Record a notice whose deadline is ``grace_seconds`` from now."""
        self.post_deadline(source, self.clock() + grace_seconds)

    def post_deadline(self, source: str, deadline: float) -> None:
        """Record a notice with an absolute (monotonic) deadline; the earliest one wins."""
        n = Notice(source, self.clock(), deadline)
        cur = self._notice
        if cur is None or n.deadline < cur.deadline:
            self._notice = n
        self._event.set()

    def advise(self, source: str) -> None:
        """Record an advisory (e.g. an EC2 rebalance recommendation): checkpoint early,
        but keep training."""
        with self._lock:
            self._advisories.append(source)

    def take_advisories(self) -> list[str]:
        """The advisories since the last call (called at step boundaries)."""
        with self._lock:
            out, self._advisories = self._advisories, []
        return out

    @property
    def notice(self) -> Notice | None:
        return self._notice

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


class SignalSource:
    """Turns signals into notices on a :class:`NoticeBoard`.

    Example:
        >>> src = SignalSource(board, [signal.SIGTERM], grace_seconds=30)  # doctest: +SKIP
        >>> src.install(); ...; src.restore()
    """

    def __init__(self, board: NoticeBoard, signals: tuple[int, ...], grace_seconds: float) -> None:
        self.board = board
        self.signals = signals
        self.grace = grace_seconds
        self._previous: dict[int, Any] = {}
        self._original: dict[int, Any] = {}
        self._closed = False

    def install(self) -> bool:
        """Register the handlers. Returns False (and does nothing) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self._original = dict(self._previous)
        self._closed = False
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._closed:
            # Someone (e.g. a framework's own signal connector) re-installed this handler
            # after we restored the original: behave as the original would.
            prev = self._original.get(signum, signal.SIG_DFL)
            if callable(prev) and prev is not self._handle:
                prev(signum, frame)
            elif prev == signal.SIG_DFL or prev is None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.board.post(signal.Signals(signum).name, self.grace)
        prev = self._previous.get(signum)
        if callable(prev) and prev is not self._handle:
            prev(signum, frame)

    def restore(self) -> None:
        self._closed = True
        for sig, prev in self._previous.items():
            try:
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not on the main thread any more
                pass
        self._previous.clear()
