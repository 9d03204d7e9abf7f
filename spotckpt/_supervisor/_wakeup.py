"""What the supervisor waits on between polls: signals, the child's exit, changes in the
local dir, and a poke from the watcher. Process layer; stdlib only.

Without it the supervisor polled every 0.1 s, and each poll walked the process table and
the command's open files: 4% of a core while the command idled. With it the supervisor
sleeps in ``select`` and polls at once when something happens:

- a signal (``signal.set_wakeup_fd``): a notice is forwarded without delay;
- the child's exit (a pidfd, Linux 5.3+), and any other child's (SIGCHLD: an orphan
  re-parented to us is reaped at once);
- a file closed after writing, created, moved or deleted anywhere under the local dir
  (inotify, Linux): the writer gate learns promptly that the writer was alive when it
  closed the file, and a new ``step-*/`` is submitted at once;
- :meth:`Wakeup.poke`: the watcher waits for a confirmation of the writers
  (:meth:`spotckpt._watch._rules.WriterGate.admit`).

Where one of these is unavailable (no inotify, a full watch table, another OS) the
supervisor keeps the short poll: events only ever shorten a wait.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import struct
import sys
from pathlib import Path

_IN_ATTRIB, _IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_ONLYDIR, _IN_Q_OVERFLOW, _IN_ISDIR = 0x100, 0x200, 0x1000000, 0x4000, 0x40000000
_MASK = _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT = struct.Struct("iIII")


class _Inotify:
    """A recursive inotify watch on one tree (ctypes; Linux only). ``ok`` is False when a
    watch could not be added: changes may then go unseen and the caller must poll."""

    def __init__(self, root: Path) -> None:
        self.ok, self.fd, self._wds = False, -1, {}
        if not sys.platform.startswith("linux"):
            return
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return
        if self.fd < 0:
            return
        self.ok = True
        self._add_tree(str(root))

    def _add_tree(self, top: str) -> None:
        for d, _, _ in os.walk(top, onerror=lambda e: None):
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(d), _MASK | _IN_ONLYDIR)
            if wd >= 0:
                self._wds[wd] = d
            elif ctypes.get_errno() not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                self.ok = False  # ENOSPC: the watch table is full

    def drain(self) -> bool:
        """Read pending events (watching new subdirectories); True if any."""
        seen = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            except OSError:
                self.ok = False
                return True
            if not buf:
                return seen
            seen = True
            i = 0
            while i + _EVENT.size <= len(buf):
                wd, mask, _, n = _EVENT.unpack_from(buf, i)
                name = buf[i + _EVENT.size:i + _EVENT.size + n].rstrip(b"\0")
                i += _EVENT.size + n
                if mask & _IN_Q_OVERFLOW:
                    continue  # events were lost; the caller polls anyway, as for any event
                if mask & _IN_ISDIR and mask & (_IN_CREATE | _IN_MOVED_TO) and wd in self._wds:
                    self._add_tree(os.path.join(self._wds[wd], os.fsdecode(name)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _ignore(signum: int, frame: object) -> None:
    pass


class Wakeup:
    """Wait until a signal, the child's exit, a change under ``root`` or a poke, or a
    timeout. Install from the main thread (``signal.set_wakeup_fd``); :meth:`close` undoes it.

    Example:
        >>> w = Wakeup(Path("/opt/ml/checkpoints"))  # doctest: +SKIP
        >>> w.watch_child(proc.pid); woke = w.wait(2.0)
    """

    def __init__(self, root: Path) -> None:
        self._sig_r, self._sig_w = os.pipe()
        self._poke_r, self._poke_w = os.pipe()
        for fd in (self._sig_r, self._sig_w, self._poke_r, self._poke_w):
            os.set_blocking(fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        # A handler, so that SIGCHLD reaches the wakeup fd (ignored signals never do).
        self._old_chld = signal.signal(signal.SIGCHLD, _ignore)
        self._pidfd = -1
        self._inotify = _Inotify(root)

    @property
    def sees_changes(self) -> bool:
        """Whether changes in the local dir wake us (else the caller must keep polling)."""
        return self._inotify.ok

    def watch_child(self, pid: int) -> None:
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = -1  # the caller's timeout still notices the exit

    def poke(self) -> None:
        """Wake the waiter now (any thread)."""
        try:
            os.write(self._poke_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    def wait(self, timeout: float) -> set[str]:
        """Sleep up to ``timeout`` s. Returns what woke us (drained): a subset of
        ``{"signal", "poke", "child", "change"}``; empty on timeout."""
        names = {self._sig_r: "signal", self._poke_r: "poke", self._pidfd: "child",
                 self._inotify.fd: "change"}
        try:
            ready, _, _ = select.select([f for f in names if f >= 0], [], [], max(0.0, timeout))
        except InterruptedError:
            return {"signal"}
        for fd in ready:
            if fd == self._inotify.fd:
                self._inotify.drain()
            elif fd != self._pidfd:  # a pidfd stays readable once the child has exited
                try:
                    while os.read(fd, 4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
        return {names[fd] for fd in ready}

    def close(self) -> None:
        try:
            signal.set_wakeup_fd(self._old_wakeup)
            signal.signal(signal.SIGCHLD, self._old_chld if self._old_chld is not None else signal.SIG_DFL)
        except ValueError:
            pass
        self._inotify.close()
        for fd in (self._sig_r, self._sig_w, self._poke_r, self._poke_w, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._pidfd = -1
