"""Interruption notices. Sources record a :class:`Notice`; they never save anything.

The signal handler follows Lightning's ``signal_connector``: it records the notice, chains
the handler it replaced, registers only on the main thread, and restores the original
handlers on close. The save happens later, at a step boundary, in ordinary code.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import select
import signal
import stat
import threading
import time
from types import FrameType
from typing import Any, Callable, Mapping

log = logging.getLogger("spotckpt")

LIFELINE_ENV = "SPOTCKPT_SUPERVISOR_FD"  # "<fd>:<inode>" of the supervisor's lifeline pipe
SUPERVISOR_GONE = "supervisor-gone"


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


# Signals that must not cut an interruption save short once a notice is in hand (a second
# SIGTERM, a Ctrl-C's SIGINT and its KeyboardInterrupt), notice signals or not.
SHIELDED = (signal.SIGTERM, signal.SIGINT)


class SignalSource:
    """Turns signals into notices on a :class:`NoticeBoard`.

    Once a notice is in hand (this source posted it, or :meth:`shield` was called when the
    interruption save began), SIGTERM and SIGINT are *shielded*: recorded
    (:meth:`take_ignored`), never chained, never a ``KeyboardInterrupt``, until
    :meth:`unshield` or :meth:`restore`.

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
        self._shield_prev: dict[int, Any] = {}  # shielded signals that are not notice signals
        self._shielding = False
        self._ignored: list[int] = []
        self._closed = self._exiting = False

    def install(self) -> bool:
        """Register the handlers. Returns False (and does nothing) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self._original = dict(self._previous)
        self._closed = self._exiting = self._shielding = False
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._exiting:
            return  # the interruption save is done and the process is leaving with 143
        if self._shielding and not self._closed:
            self._ignored.append(signum)  # a notice is in hand: this could only cut its save short
            return
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
        # Python's own SIGINT handler raises KeyboardInterrupt: chained, it would turn a
        # notice into an exception in the middle of the interruption save.
        if callable(prev) and prev is not self._handle and prev is not signal.default_int_handler:
            prev(signum, frame)
        self.shield()  # (a signal handler runs on the main thread)

    def shield(self) -> None:
        """From now on SIGTERM and SIGINT do not interrupt: a notice is in hand and its save
        must not be cut short. Main thread only (else nothing)."""
        if self._shielding or self._closed or threading.current_thread() is not threading.main_thread():
            return
        self._shielding = True
        for sig in SHIELDED:
            if sig in self._previous:
                continue  # a notice signal: ours already
            try:
                self._shield_prev[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
            except (ValueError, OSError):
                self._shield_prev.pop(sig, None)

    def unshield(self) -> None:
        """Signals interrupt again (the interruption save is over and the process goes on)."""
        self._shielding = False
        for sig, prev in self._shield_prev.items():
            try:
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not on the main thread any more
                pass
        self._shield_prev.clear()

    def take_ignored(self) -> list[str]:
        """Names of the signals shielded since the last call (for one log line)."""
        out, self._ignored = self._ignored, []
        return [signal.Signals(s).name for s in out]

    def _ignore_at_exit(self) -> None:
        for sig in [*self._previous, *self._shield_prev]:
            try:
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, signal.SIG_IGN)
            except (ValueError, TypeError):
                pass

    def restore(self, *, until_exit: bool = False) -> None:
        """Put the previous handlers back. ``until_exit``: the process is leaving with 143
        after an interruption save, so ignore further notices instead (a second SIGTERM, a
        SIGINT 50 ms later): restored, they would turn the exit status into a death by
        signal or a KeyboardInterrupt traceback. Ours stay installed (as no-ops) and become
        ``SIG_IGN`` at exit, because the interpreter resets Python handlers to the default
        while it shuts down."""
        if until_exit:
            self._exiting = True
            atexit.register(self._ignore_at_exit)
            return
        self.unshield()
        self._closed = True
        for sig, prev in self._previous.items():
            try:
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not on the main thread any more
                pass
        self._previous.clear()


class LifelineSource:
    """Posts a notice when the supervisor (``spotckpt run``) that started us is gone.

    The supervisor keeps the write end of a pipe and passes the read end down the
    command's process tree (its number and inode in ``SPOTCKPT_SUPERVISOR_FD``). When the
    supervisor dies, even by SIGKILL, the kernel closes the write end and the read end
    reports hang-up: nobody uploads any more, so the Checkpointer saves locally and stops
    (the next ``spotckpt run`` on the dir uploads that save). Event-driven: one thread
    blocked in ``poll``, no polling interval.

    Example:
        >>> src = LifelineSource.from_env(board, grace_seconds=30)  # doctest: +SKIP
        >>> if src: src.start(); ...; src.stop()
    """

    def __init__(self, board: NoticeBoard, fd: int, grace_seconds: float) -> None:
        self.board, self.fd, self.grace = board, fd, grace_seconds
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, board: NoticeBoard, grace_seconds: float,
                 env: Mapping[str, str] | None = None) -> LifelineSource | None:
        """The source for the lifeline this process inherited, or None. The inode check
        matters: a process started with ``close_fds`` inherits the variable but not the
        pipe, and the number may then name an unrelated file."""
        value = (os.environ if env is None else env).get(LIFELINE_ENV, "")
        try:
            fd_text, ino_text = value.split(":")
            fd, ino = int(fd_text), int(ino_text)
            st = os.fstat(fd)
        except (ValueError, OSError):
            return None
        if not stat.S_ISFIFO(st.st_mode) or st.st_ino != ino:
            return None
        return cls(board, fd, grace_seconds)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spotckpt-lifeline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                ready = dict(poller.poll())
            except InterruptedError:
                continue
            if self._wake_r in ready:
                return
            if ready.get(self.fd, 0) & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                log.warning("spotckpt: the supervisor (spotckpt run) is gone: nobody uploads any "
                            "more; saving locally and stopping")
                self.board.post(SUPERVISOR_GONE, self.grace)
                return
            if ready.get(self.fd):
                try:  # data nobody should have written: drain it and keep watching
                    os.read(self.fd, 4096)
                except OSError:
                    return

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=3)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
