"""``spotckpt run -- CMD``: the supervisor that keeps an unmodified training command safe.

Process layer. In order:

1. Check the command exists, take the local dir, probe the remote (one clear error each).
2. Pull: the newest verified checkpoint and the free-form files into the local dir, as
   SageMaker does before a (re)start.
3. Start the child with ``SPOTCKPT_SUPERVISED=1``: an in-process Checkpointer then only
   commits locally and leaves uploads and local retention to us. While it runs we submit
   each newly committed ``step-*/`` to the Syncer (which also mirrors free-form files once
   stable and closed), apply local retention after uploads, and reap orphaned zombies.
4. On SIGTERM/SIGINT (or a configured signal): forward it (see :mod:`._proctree` for who
   gets it), start the deadline clock, keep uploading what the child commits, and SIGKILL
   the child's tree if it would overrun ``grace - time the final upload needs``.
5. When the child exits: final flush within the deadline, log what is durable, stop every
   leftover process, exit with the child's status (128 + N if a signal N killed it).

Safe as PID 1 in a container: every signal we forward has a handler (PID 1 ignores
unhandled ones), orphans are re-parented to us and reaped, nothing outlives us.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import _proctree as pt
from ._config import Config
from ._engine import Engine
from ._errors import ConfigError
from ._events import EventLog, log
from ._local import LocalDir
from ._pull import human_bytes, is_freeform, open_remote, pull
from ._store import RemoteStore
from ._syncer import Syncer

_DEFAULT_THROUGHPUT = 20e6   # bytes/s assumed for the final upload until one is measured
_MIN_CHILD_SHARE = 0.5       # the child always gets at least half the grace to save
_MARGIN = 0.5                # seconds kept back for our own exit


class _Tap(EventLog):
    """The events log, plus a tally of what reached the remote (for the final report)."""

    def __init__(self, local: LocalDir) -> None:
        super().__init__(local.meta / "events.jsonl")
        self.local, self.root = local, local.root
        self.last_upload: dict[str, Any] | None = None
        self.mirrored: dict[str, int] = {}

    def emit(self, event: str, **fields: Any) -> None:
        # Uploads also record when the uploaded state was made (manifest time, file mtime),
        # so the emulator can tell how much work an interruption lost.
        if event == "upload_done":
            try:
                fields["created"] = self.local.read_manifest(int(fields["step"])).created
            except Exception:  # noqa: BLE001 - informational only
                pass
            self.last_upload = fields
        elif event == "mirror_upload":
            try:
                fields["mtime"] = round((self.root / str(fields["path"])).stat().st_mtime, 3)
            except (OSError, KeyError):
                pass
            self.mirrored[str(fields.get("path"))] = int(fields.get("bytes") or 0)
        super().emit(event, **fields)


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


class Supervisor:
    """Runs one training command under checkpoint supervision.

    Args:
        cmd: the command and its arguments.
        cfg: resolved settings (local dir, remote, keep_last, grace, signals).
        scope: who receives forwarded signals: ``auto``, ``tree`` or ``child``.
        stable_seconds: how long a free-form file must stay unchanged before upload.

    Example:
        >>> sup = Supervisor(["python", "train.py"], Config.resolve(remote="s3://b/run/"))  # doctest: +SKIP
        >>> sup.prepare(); sys.exit(sup.run())
    """

    def __init__(self, cmd: Sequence[str], cfg: Config, *, scope: str = "auto",
                 stable_seconds: float = 2.0, poll: float = 0.1, pull: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if scope not in pt.SCOPES:
            raise ConfigError(f"spotckpt: --signal-scope {scope!r}: use one of {', '.join(pt.SCOPES)}")
        self.cmd, self.cfg, self.scope = list(cmd), cfg, scope
        self.stable_seconds, self.poll, self.do_pull, self.clock = stable_seconds, poll, pull, clock
        self.local = LocalDir(cfg.local_dir)
        self.events = _Tap(self.local)
        self.store: RemoteStore | None = None
        self.syncer: Syncer | None = None
        self.engine: Engine | None = None
        self.child: subprocess.Popen | None = None
        self.deadline: float | None = None
        self.notice_at: float | None = None
        self.killed = False
        self._pending_signals: list[int] = []
        self._submitted: int | None = None
        self._writers: set[str] = set()
        self._old_handlers: dict[int, Any] = {}

    # -- before the child ------------------------------------------------------------------
    def prepare(self) -> None:
        """Validate, lock the local dir, probe the remote and pull.

        Raises:
            ConfigError, LocalDirError, CheckpointLockedError, RemoteError: one clear line.
        """
        self.cmd = resolve_command(self.cmd)
        self.local.lock("supervisor")
        self._install_signals()
        if self.cfg.remote:
            self.store = open_remote(self.cfg.remote, self.cfg.storage_options)
            self.syncer = Syncer(self.local, self.store, keep_last=self.cfg.keep_last,
                                 events=self.events, stable_seconds=self.stable_seconds,
                                 scan_interval=min(2.0, max(0.5, self.stable_seconds / 2)))
            if self.do_pull:
                res = pull(self.local, self.store, events=self.events,
                           on_pulled=self.syncer.mark_mirrored)
                log.info("spotckpt run: pulled from %s: %s", self.cfg.remote, res.describe())
                if res.step is not None:
                    self._submitted = res.step
        else:
            self.local.clean_temp()
            log.warning("spotckpt run: no remote (set --remote or SPOTCKPT_REMOTE): "
                        "checkpoints stay in %s only", self.cfg.local_dir)
        self.engine = Engine(self.local, syncer=self.syncer, keep_last=self.cfg.keep_last,
                             events=self.events)

    # -- signals ---------------------------------------------------------------------------
    def _install_signals(self) -> None:
        for sig in dict.fromkeys([signal.SIGTERM, signal.SIGINT, *self.cfg.signals]):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._pending_signals.append(signum)  # the main loop forwards it

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _take_signals(self) -> None:
        while self._pending_signals:
            sig = self._pending_signals.pop(0)
            name = signal.Signals(sig).name
            now = self.clock()
            if self.deadline is None:
                self.notice_at, self.deadline = now, now + self.cfg.grace_seconds
                self.events.emit("notice", source=name, by="supervisor", seconds_left=self.cfg.grace_seconds)
            if self.child is None or self.child.poll() is not None:
                continue
            procs = pt.targets(self.child.pid, self.scope)
            self._writers |= pt.writing_under(pt.tree(self.child.pid), self.local.root)
            n = pt.send(procs, sig)
            left = self.deadline - now
            log.warning("spotckpt run: %s: forwarded to %d process(es); deadline in %.1f s, "
                        "the child is killed if still running in %.1f s", name, n, left,
                        max(0.0, self._kill_at() - now))
            self.events.emit("signal_forwarded", signal=name, processes=n, seconds_left=round(left, 2))

    # -- while the child runs --------------------------------------------------------------
    def run(self) -> int:
        """Start the child, supervise it, flush, and return the exit status to use."""
        if self.engine is None:
            self.prepare()
        pt.become_subreaper()
        if self._pending_signals:  # stopped while pulling: nothing to run
            log.warning("spotckpt run: %s before the command started; not starting it",
                        signal.Signals(self._pending_signals[0]).name)
            self._finish(None)
            return 128 + self._pending_signals[0]
        if self.syncer is not None:
            self.syncer.start()
            if self._submitted is not None:
                self.syncer.submit(self._submitted)
        env = dict(os.environ, SPOTCKPT_SUPERVISED="1", SPOTCKPT_LOCAL_DIR=str(self.cfg.local_dir),
                   SPOTCKPT_GRACE_SECONDS=str(self.cfg.grace_seconds),
                   SPOTCKPT_KEEP_LAST=str(self.cfg.keep_last),
                   SPOTCKPT_SIGNALS=",".join(signal.Signals(s).name for s in self.cfg.signals))
        if self.cfg.remote:
            env["SPOTCKPT_REMOTE"] = self.cfg.remote
        # Own process group: a terminal's Ctrl-C reaches us only, and we forward it once.
        group: dict[str, Any] = ({"process_group": 0} if sys.version_info >= (3, 11)
                                 else {"preexec_fn": os.setpgrp})
        try:
            self.child = subprocess.Popen(self.cmd, env=env, **group)
        except OSError as e:
            self._finish(None)
            raise ConfigError(f"spotckpt: cannot start {self.cmd[0]!r}: {e.strerror or e}") from None
        self.events.emit("child_start", pid=self.child.pid, cmd=self.cmd)
        log.info("spotckpt run: started %s (pid %d)", " ".join(self.cmd), self.child.pid)
        rc = self._supervise()
        return self._finish(rc)

    def _supervise(self) -> int:
        assert self.child is not None
        while True:
            self._take_signals()
            rc = self.child.poll()
            if rc is not None:
                return rc
            self._writers = pt.writing_under(pt.tree(self.child.pid), self.local.root)
            self._scan()
            pt.reap(exclude=self.child.pid)
            if self.deadline is not None and not self.killed and self.clock() >= self._kill_at():
                self._kill_child()
            time.sleep(self.poll)

    def _scan(self) -> None:
        """Submit the newest committed checkpoint, then apply local retention."""
        steps = self.local.committed()
        if steps and (self._submitted is None or steps[-1] > self._submitted):
            self._submitted = steps[-1]
            if self.syncer is not None:
                self.syncer.submit(steps[-1])
        if self.engine is not None and len(steps) > self.cfg.keep_last:
            self.engine.retention()

    def _final_upload_estimate(self) -> float:
        """Seconds the final upload will need: the newest checkpoint's size (the child's
        last save will be about as big) at the measured upload rate, plus overhead."""
        if self.syncer is None:
            return 0.0
        steps = self.local.committed()
        size = 0
        if steps:
            try:
                size = self.local.read_manifest(steps[-1]).total_bytes
            except Exception:  # noqa: BLE001 - an estimate only
                size = 0
        s = self.syncer
        rate = s.bytes_uploaded / s.upload_seconds if s.upload_seconds > 0.05 and s.bytes_uploaded > 1e5 \
            else _DEFAULT_THROUGHPUT
        return 1.0 + 1.5 * size / max(rate, 1.0)

    def _kill_at(self) -> float:
        assert self.deadline is not None and self.notice_at is not None
        grace = self.deadline - self.notice_at
        return max(self.notice_at + _MIN_CHILD_SHARE * grace,
                   self.deadline - self._final_upload_estimate() - _MARGIN)

    def _kill_child(self) -> None:
        assert self.child is not None and self.deadline is not None
        procs = pt.tree(self.child.pid)
        self._writers |= pt.writing_under(procs, self.local.root)
        pt.send(procs, signal.SIGKILL)
        self.killed = True
        left = self.deadline - self.clock()
        log.error("spotckpt run: the command did not exit in time; killed it (SIGKILL) with "
                  "%.1f s left, to leave time for the final upload", left)
        self.events.emit("child_killed", seconds_left=round(left, 2))

    # -- after the child -------------------------------------------------------------------
    def _finish(self, rc: int | None) -> int:
        status = pt.exit_status(rc) if rc is not None else 0
        try:
            if rc is not None:
                self.events.emit("child_exit", status=status, killed=self.killed)
                log.info("spotckpt run: the command exited with status %d", status)
            self._scan()
            if self.syncer is not None:
                self._final_flush(rc)
            elif self.engine is not None:
                self.engine.retention()
        finally:
            pt.stop_descendants(timeout=self._seconds_left(default=2.0, cap=2.0))
            self._restore_signals()
            self.local.unlock()
        return status

    def _seconds_left(self, *, default: float, cap: float | None = None) -> float:
        if self.deadline is None:
            return default
        left = max(0.0, self.deadline - self.clock() - _MARGIN)
        return min(left, cap) if cap is not None else left

    def _final_flush(self, rc: int | None) -> None:
        assert self.syncer is not None
        torn: set[str] = set()
        if rc not in (None, 0) and self._writers:
            # The command died while these were open for writing: they may be torn. Keep
            # the previous remote copy rather than overwrite it with a partial file.
            root = str(self.local.root.resolve()) + os.sep
            torn = {p[len(root):] for p in self._writers
                    if p.startswith(root) and is_freeform(p[len(root):], self.local.root)}
        if torn:
            self.syncer.hold.update(torn)
            log.warning("spotckpt run: not uploading %s: it was being written when the command "
                        "died; the remote keeps its previous version", ", ".join(sorted(torn)))
        timeout = None if self.deadline is None else self._seconds_left(default=0.0)
        t0 = self.clock()
        ok = self.syncer.flush(timeout)
        self._scan()  # retention, now that uploads are done
        durable = self.syncer.durable_step
        step_bytes = 0
        if durable is not None and self.local.is_committed(durable):
            step_bytes = self.local.read_manifest(durable).total_bytes
        files = {k: v for k, v in self.events.mirrored.items() if k not in torn}
        what = (f"checkpoint step {durable} ({human_bytes(step_bytes)})" if durable is not None
                else "no checkpoint")
        what += f", {len(files)} free-form file(s) uploaded this run ({human_bytes(sum(files.values()))})"
        left = "" if self.deadline is None else f"; {max(0.0, self.deadline - self.clock()):.1f} s left before the deadline"
        newest = self.local.committed()[-1:] or [None]
        if ok:
            log.warning("spotckpt run: durable at %s: %s%s (final flush %.1f s)", self.cfg.remote, what,
                        left, self.clock() - t0)
        else:
            log.error("spotckpt run: NOT everything is durable at %s (%s): newest local step %s; "
                      "durable: %s%s", self.cfg.remote, self.syncer.last_error or "deadline reached",
                      newest[0], what, left)
        self.events.emit("final_flush", durable=ok, durable_step=durable, step_bytes=step_bytes,
                         files=len(files), file_bytes=sum(files.values()),
                         seconds_left=None if self.deadline is None else round(self.deadline - self.clock(), 2))
        self.syncer.close(timeout=min(1.0, self._seconds_left(default=1.0)))
