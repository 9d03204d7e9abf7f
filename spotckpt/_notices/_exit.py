"""Leaving the process by the deadline after an interruption save.

Once the interruption save is durable (or its budget is spent), nothing the process still
does can make anything more durable, and everything it still does is stretched by CPU
load: at a load average of 12 on 2 cores the interpreter's own teardown (module cleanup,
torch's destructors) took 6 s after the last ``atexit`` handler, against 0.6 s idle, and a
non-daemon thread still sending an abandoned upload holds the exit until it is done.

So once an interruption save starts in a process that is to end with 143 (:func:`arm`):

- a watchdog thread ends the process with ``os._exit(status)`` at the deadline minus
  :data:`EXIT_MARGIN`, whatever it is doing then (a save slower than planned, a ``finally``
  block or an ``atexit`` handler that overruns), with one line on stderr naming where the
  main thread was;
- the process leaves by raising :class:`Leaving` (a ``SystemExit``): ``finally`` blocks run;
  if it reaches the top, the interpreter's shutdown runs the ``atexit`` handlers, flushes
  stdout, stderr and the logging handlers, and ends the process with ``os._exit(status)``:
  leftover non-daemon threads are not waited for, the interpreter's teardown is skipped.
  If the caller catches it instead (a test, a notebook), both are disarmed: catching it is
  handling the interruption yourself.

Process layer: no ML imports.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Callable

EXIT_USAGE = 2          # a bad argument or setting, found before anything started (argparse's own)
EXIT_STALE = 3          # an instance stopped because a newer generation of its job started
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what a container runtime reports for a SIGTERM exit

EXIT_MARGIN = 1.0   # seconds before the deadline at which the watchdog ends the process: the
                    # kernel's own exit of a torch process took up to 0.3 s at load 14 on 2 cores
_FLUSH_WAIT = 0.1   # the watchdog waits at most this for stdio (a full pipe must not hold it)

_lock = threading.Lock()
_status: int | None = None     # armed: the status the process ends with
_ending = False                # a Leaving reached the top: the interpreter is shutting down with it
_deadline = float("inf")       # time.monotonic() by which the process must be gone
_wake = threading.Event()
_thread: threading.Thread | None = None
_hooked = False


class Leaving(SystemExit):
    """``SystemExit(status)`` that ends the process at once if nobody catches it.

    How it tells: an uncaught ``SystemExit`` is released by the interpreter itself, with no
    Python frame on the stack, right before it shuts down; a caught one is released by the
    code that caught it (the end of its ``except`` block, or later).
    """

    def __del__(self) -> None:
        global _ending
        try:
            sys._getframe(1)
        except ValueError:  # released by the interpreter: the process is ending with it
            _ending = _status is not None
        else:
            disarm()  # caught: whoever caught it handles the interruption


def arm(deadline: float, status: int, *, clock: Callable[[], float] = time.monotonic) -> None:
    """Commit the process to ending with ``status`` by ``deadline`` (a time on ``clock``).

    Starts the watchdog (an earlier deadline moves it, a later one does not) and registers
    the shutdown hook; returns at once. Leave with ``raise Leaving(status)``.

    Example:
        >>> arm(notice.deadline, 143)   # doctest: +SKIP
        >>> ...                         # the interruption save, within the deadline
        >>> raise Leaving(143)          # finally blocks and atexit handlers run, then os._exit(143)
    """
    global _status, _deadline, _thread, _hooked
    mono = time.monotonic() + (deadline - clock())
    with _lock:
        _status = status
        _deadline = min(_deadline, mono)
        if not _hooked:
            _hooked = True
            register = getattr(threading, "_register_atexit", None)
            try:
                # threading's hooks run first at shutdown, before the joins of non-daemon
                # threads (concurrent.futures' own hook, which waits for every worker, too)
                (register or atexit.register)(_at_shutdown)
            except RuntimeError:  # the interpreter is already shutting down
                pass
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="spotckpt-exit-watchdog", daemon=True)
            _thread.start()
    _wake.set()


def disarm() -> None:
    """Forget the commitment (the ``Leaving`` was caught)."""
    global _status, _deadline, _ending
    with _lock:
        _status, _deadline, _ending = None, float("inf"), False
    _wake.set()


def armed() -> bool:
    return _status is not None


def _at_shutdown() -> None:
    """The interpreter is shutting down because of a Leaving: run the atexit handlers,
    flush, end the process."""
    status = _status
    if not _ending or status is None:
        return
    run = getattr(atexit, "_run_exitfuncs", None)
    if run is not None:
        try:
            run()  # as the interpreter would; it prints a failing handler's traceback itself
        except BaseException:  # noqa: BLE001 - the exit must happen whatever a handler did
            pass
    _flush()
    os._exit(status)


def _watch() -> None:
    while True:
        _wake.clear()
        left = _deadline - EXIT_MARGIN - time.monotonic()
        if left <= 0 and _status is not None:
            break
        _wake.wait(None if left == float("inf") else max(left, 0.0))
    status = _status if _status is not None else 1
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    where = (f" (main thread in {frame.f_code.co_name}, {frame.f_code.co_filename}:{frame.f_lineno})"
             if frame is not None else "")
    try:
        os.write(2, (f"spotckpt: {EXIT_MARGIN:g} s before the deadline and the process is still "
                     f"running{where}: ending it now with status {status}\n").encode())
    except OSError:
        pass
    # Another thread may hold stdout's lock while blocked on a full pipe: flush aside, briefly.
    t = threading.Thread(target=_flush, name="spotckpt-exit-flush", daemon=True)
    t.start()
    t.join(_FLUSH_WAIT)
    os._exit(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing to save
            pass
    for ref in list(getattr(logging, "_handlerList", [])):
        try:
            h = ref()
            if h is not None:
                h.flush()
        except Exception:  # noqa: BLE001
            pass
