"""Starting the supervised command so that it cannot outlive the supervisor.

Process layer. The command gets:

- its own process group (a terminal's Ctrl-C reaches the supervisor only, which forwards
  it once);
- a parent-death signal (Linux ``PR_SET_PDEATHSIG``): if the supervisor dies, even by
  SIGKILL, the kernel sends the command SIGTERM, which a ``Checkpointer`` treats as a
  notice (save locally, exit 143) and an unmodified script dies of;
- a *lifeline*: the read end of a pipe whose write end only the supervisor holds, passed
  down the whole tree (``SPOTCKPT_SUPERVISOR_FD``). A ``Checkpointer`` anywhere in the tree
  (behind a shell, under torchrun) sees the hang-up when the supervisor is gone, and saves
  and stops (:class:`~spotckpt._notices.LifelineSource`). The parent-death signal only
  reaches the direct child; the lifeline reaches every process that inherited it.

Either way the lock on the local dir is released, so a restarted ``spotckpt run`` can start
its own command.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from typing import Callable, Mapping, Sequence

from spotckpt._errors import ConfigError
from spotckpt._notices import LIFELINE_ENV

_PR_SET_PDEATHSIG = 1
PARENT_DEATH_SIGNAL = signal.SIGTERM


def resolve_command(cmd: Sequence[str]) -> list[str]:
    """The command with its program checked, so a typo fails before anything is pulled.

    Raises:
        ConfigError: no command, or the program is not found / not executable.
    """
    if not cmd:
        raise ConfigError("spotckpt: no command given; usage: spotckpt run [options] -- CMD [ARGS...]")
    prog = cmd[0]
    if os.sep in prog:
        if not (os.path.isfile(prog) and os.access(prog, os.X_OK)):
            raise ConfigError(f"spotckpt: command not found or not executable: {prog!r}")
    elif shutil.which(prog) is None:
        raise ConfigError(f"spotckpt: command not found: {prog!r} (not on PATH)")
    return list(cmd)


def _preexec(parent: int) -> Callable[[], None]:
    """What the forked child runs before exec: own process group, parent-death signal.

    Everything it calls is resolved here, in the parent: the child only makes two system
    calls through already-loaded functions.
    """
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    setpgid, getppid, kill, getpid = os.setpgid, os.getppid, os.kill, os.getpid
    sig = int(PARENT_DEATH_SIGNAL)

    def hook() -> None:
        setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
            if getppid() != parent:  # the supervisor died between fork and prctl
                kill(getpid(), sig)
    return hook


class Child:
    """The running command and the supervisor's end of its lifeline.

    Example:
        >>> child = Child.start(["python", "train.py"], env)  # doctest: +SKIP
        >>> child.proc.wait(); child.close()
    """

    def __init__(self, proc: subprocess.Popen, lifeline_w: int) -> None:
        self.proc, self._lifeline_w = proc, lifeline_w

    @classmethod
    def start(cls, cmd: Sequence[str], env: Mapping[str, str]) -> Child:
        """Start ``cmd``. Raises OSError if it cannot be started."""
        r, w = os.pipe()  # both close-on-exec: only ``r`` is passed on, explicitly
        env = dict(env)
        env[LIFELINE_ENV] = f"{r}:{os.fstat(r).st_ino}"
        try:
            proc = subprocess.Popen(list(cmd), env=env, pass_fds=(r,), preexec_fn=_preexec(os.getpid()))
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return cls(proc, w)

    def close(self) -> None:
        """Drop our end of the lifeline (when nothing of the command is left)."""
        if self._lifeline_w >= 0:
            os.close(self._lifeline_w)
            self._lifeline_w = -1
