"""Process trees for the supervisor: forward signals, reap zombies, leave no orphans.

Process layer; psutil only.

Who gets a forwarded signal (``scope``):

- ``tree``: the child and every descendant.
- ``child``: the child only (it is trusted to stop its own children).
- ``auto`` (default): the child and every descendant *whose parent is not a Python
  process*. A shell wrapper (``sh -c "python train.py"``) does not pass SIGTERM on, so its
  children get it from us; but a Python parent manages its own children: a SIGTERM sent
  straight to a PyTorch DataLoader worker kills it, and the training process then dies of
  "DataLoader worker exited unexpectedly" before it can save. torchrun and
  multiprocessing pools likewise shut their workers down themselves.

Whatever the scope, when the deadline comes the whole tree is killed, and every process
left behind after the child exits is terminated: nothing outlives the supervisor.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import psutil

SCOPES = ("auto", "tree", "child")
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants our children (Linux), so we can reap and stop them even
    when we are not PID 1. Returns whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _is_python(p: psutil.Process) -> bool:
    try:
        names = [p.name()]
        try:
            names.append(os.path.basename(p.exe()))
        except (psutil.Error, OSError):
            pass
    except psutil.Error:
        return False
    return any(n.lower().startswith(("python", "pypy")) for n in names)


def _kids(pid: int) -> list[int] | None:
    """Direct children of ``pid`` from ``/proc/PID/task/*/children`` (Linux), reading only
    this tree; None where that file is missing. psutil reads the whole process table
    instead (``/proc/*/stat``): most of the supervisor's polling cost on a busy machine."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    except OSError:
        return None
    out: list[int] = []
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{t}"):
                continue  # the thread ended
            return None   # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return out


def _below(pid: int) -> list[psutil.Process]:
    """All descendants of ``pid``, parents before children."""
    if _kids(pid) is None:
        try:
            return psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
    out, todo, seen = [], [pid], {pid}
    while todo:
        for k in _kids(todo.pop(0)) or []:
            if k in seen:
                continue
            seen.add(k)
            try:
                out.append(psutil.Process(k))
                todo.append(k)
            except psutil.Error:
                pass
    return out


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (parents before children); [] if it is gone."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return []
    return [root, *_below(pid)]


def descendants() -> list[psutil.Process]:
    """Every descendant of this process (orphans re-parented to us included)."""
    return _below(os.getpid())


def targets(pid: int, scope: str) -> list[psutil.Process]:
    """The processes a forwarded signal goes to (see the module docstring)."""
    procs = tree(pid)
    if scope == "tree" or not procs:
        return procs
    if scope == "child":
        return procs[:1]
    out = procs[:1]
    for p in procs[1:]:
        try:
            parent = p.parent()
        except psutil.Error:
            continue
        if parent is None or not _is_python(parent):
            out.append(p)
    return out


def send(procs: list[psutil.Process], sig: int) -> int:
    """Send ``sig`` to each process still alive. Returns how many got it."""
    n = 0
    for p in procs:
        try:
            p.send_signal(sig)
            n += 1
        except psutil.Error:
            pass
    return n


def reap(exclude: int | None = None) -> list[int]:
    """Collect exited children of this process (orphans re-parented to us), except
    ``exclude`` (the child whose status subprocess.Popen collects). Never blocks."""
    reaped: list[int] = []
    kids = _kids(os.getpid())
    if kids is None:
        try:
            kids = [k.pid for k in psutil.Process().children()]
        except psutil.Error:
            return reaped
    for k in kids:
        if k == exclude:
            continue
        try:
            pid, _ = os.waitpid(k, os.WNOHANG)
        except ChildProcessError:
            continue
        if pid:
            reaped.append(pid)
    return reaped


def stop_descendants(exclude: int | None = None, *, timeout: float = 2.0) -> int:
    """SIGTERM every remaining descendant of this process, SIGKILL what is left after
    ``timeout``, and reap them. Returns how many there were."""
    left = [p for p in descendants() if p.pid != exclude]
    if not left:
        return 0
    send(left, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        reap(exclude)
        if not any(alive(p) for p in left):
            break
        time.sleep(0.05)
    send([p for p in left if alive(p)], signal.SIGKILL)
    end = time.monotonic() + 2.0
    while time.monotonic() < end and any(alive(p) for p in left):
        reap(exclude)
        time.sleep(0.02)
    reap(exclude)
    return len(left)


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_PF_EXITING = 0x4  # include/linux/sched.h: the task has begun to exit


def dying(procs: list[psutil.Process], main: int) -> bool:
    """Whether a process of the tree is in the middle of exiting: past the start of its
    exit, where the kernel closes its files (a file it was writing is closed torn), but not
    yet reaped. ``waitpid`` still reports such a process running, so a poll in that window
    must not count as "the command was alive". A zombie other than ``main`` (an unreaped
    child of the command) is done exiting and does not count. Linux (``/proc``); False
    elsewhere."""
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        try:
            state, flags = fields[0], int(fields[6])
        except (IndexError, ValueError):
            continue
        if flags & _PF_EXITING and (state not in (b"Z", b"X") or p.pid == main):
            return True
    return False


def writing_under(procs: list[psutil.Process], root: Path) -> set[str]:
    """Files under ``root`` (absolute paths) that ``procs`` hold open for writing."""
    prefix = str(root.resolve()) + os.sep
    out: set[str] = set()
    for p in procs:
        try:
            files = p.open_files()
        except (psutil.Error, OSError):
            continue
        for f in files:
            if f.path.startswith(prefix) and getattr(f, "mode", "w") != "r":
                out.add(f.path)
    return out


def exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode
