"""``spotckpt run -- CMD``: the supervisor that keeps an unmodified training command safe.

Process layer. In order:

1. Check the command exists, take the local dir, probe the remote (one clear error each).
2. Pull: the newest verified checkpoint and the committed file set into the local dir, as
   SageMaker does before a (re)start.
3. Start the child (:mod:`._child`: own process group, parent-death signal, lifeline) with
   ``SPOTCKPT_SUPERVISED=1``: an in-process Checkpointer then only commits locally and
   leaves uploads and local retention to us, and treats every signal we treat as a notice
   (``SPOTCKPT_SIGNALS``) as one too. While it runs we submit each newly committed
   ``step-*/`` to the Syncer (which also mirrors the watched dir as committed file sets:
   :mod:`spotckpt._watch._watcher`), apply local retention after uploads, tell the watcher after each poll
   that the command is alive and which files it holds open (:class:`spotckpt._watch._rules.WriterGate`),
   and reap orphaned zombies.
4. On SIGTERM/SIGINT (or a configured signal): forward it once (see :mod:`._proctree` for
   who gets it; a repeated or second signal is logged, not forwarded), start the deadline
   clock, keep uploading what the child commits, and SIGKILL the child's tree if it would
   overrun ``grace - time the final upload needs``.
5. When the child exits (:mod:`._end`): processes it left behind that still write into the local dir get
   the rest of the deadline to finish (a file still open after that is not uploaded), final
   flush within the deadline, log what is durable, stop every leftover process. Exit status:
   143 after a notice whatever the child returned, else the child's (128 + N if signal N
   killed it).

Safe as PID 1 in a container: every signal we forward has a handler (PID 1 ignores
unhandled ones), orphans are re-parented to us and reaped, nothing outlives us (and if we
are killed, the child gets SIGTERM from the kernel and its Checkpointer saves and stops).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any, Callable, Sequence

from spotckpt._commit import LocalDir
from spotckpt._config import SUPERVISOR_ENV, Config
from spotckpt._errors import ConfigError
from spotckpt._events import log
from spotckpt._notices import EXIT_INTERRUPTED, _exit
from spotckpt._remote import Recorder, RemoteStore, claim
from spotckpt._sagemaker import Contract
from spotckpt._sync import Engine, Syncer, check_not_stale, open_remote, pull
from spotckpt._watch import DirRule, WriterGate

from . import _history, _proctree as pt
from ._child import Child, resolve_command
from ._end import _MARGIN, Finish, Tap
from ._wakeup import Wakeup

_DEFAULT_THROUGHPUT = 20e6   # bytes/s assumed for the final upload until one is measured
_MIN_CHILD_SHARE = 0.5       # the child always gets at least half the grace to save
_IDLE = 2.0                  # longest sleep between polls when changes in the local dir wake us


class Supervisor(Finish):
    """Runs one training command under checkpoint supervision.

    Args:
        cmd: the command and its arguments.
        cfg: resolved settings (local dir, remote, keep_last, grace, signals).
        scope: who receives forwarded signals: ``auto``, ``tree`` or ``child``.
        scan_interval: seconds between scans of the watched dir (a closed file goes up at
            the next scan).
        rules: directory-checkpoint rules (:mod:`spotckpt._watch._rules`; default: the built-ins plus
            ``SPOTCKPT_DIR_CHECKPOINTS``).
        contract: the SageMaker container contract: channels downloaded before the start,
            ``SM_*`` variables and hyperparameter arguments, ``model.tar.gz`` uploaded when
            the command completes.

    Example:
        >>> sup = Supervisor(["python", "train.py"], Config.resolve(remote="s3://b/run/"))  # doctest: +SKIP
        >>> sup.prepare(); sys.exit(sup.run())
    """

    def __init__(self, cmd: Sequence[str], cfg: Config, *, scope: str = "auto",
                 scan_interval: float = 0.5, rules: tuple[DirRule, ...] | None = None,
                 poll: float = 0.1, pull: bool = True, contract: Contract | None = None,
                 clock: Callable[[], float] = time.monotonic, leave_by_deadline: bool = False) -> None:
        if scope not in pt.SCOPES:
            raise ConfigError(f"spotckpt: --signal-scope {scope!r}: use one of {', '.join(pt.SCOPES)}")
        self.cmd, self.cfg, self.scope = list(cmd), cfg, scope
        self.scan_interval, self.poll, self.do_pull, self.clock = scan_interval, poll, pull, clock
        self.rules = rules
        self.contract = contract  # the SageMaker container contract (:mod:`spotckpt._sagemaker._env`), if asked for
        # The process ends with this run (the CLI): at a notice, arm the exit watchdog, so
        # that whatever overruns, the process is gone by the deadline (_notices._exit).
        self.leave_by_deadline = leave_by_deadline
        self.gate = WriterGate()  # tells the watcher that a closed file's writer was alive
        self.local = LocalDir(cfg.local_dir)
        self.events = Tap(self.local)
        self.store: RemoteStore | None = None
        self.syncer: Syncer | None = None
        self.engine: Engine | None = None
        self.child: subprocess.Popen | None = None
        self._child: Child | None = None
        self.deadline: float | None = None
        self.notice_at: float | None = None
        self.notice_source: str | None = None
        self.killed = False
        # Every signal that means "interruption coming", here and in a Checkpointer child.
        self.notice_signals = list(dict.fromkeys([signal.SIGTERM, signal.SIGINT, *cfg.signals]))
        self._pending_signals: list[tuple[int, float]] = []  # (signal, when it came)
        self._ranked: dict | None = None
        self._submitted: int | None = None
        self._writers: set[str] = set()
        self._old_handlers: dict[int, Any] = {}
        self._wake: Wakeup | None = None
        self.history: Recorder | None = None  # this incarnation's record in the job's history
        self.flushed = False  # the final flush made everything durable

    # -- before the child ------------------------------------------------------------------
    def prepare(self) -> None:
        """Validate, lock the local dir, probe the remote and pull.

        Raises:
            ConfigError, LocalDirError, CheckpointLockedError, RemoteError: one clear line.
            StaleLocalError: ``--no-pull`` on a dir older than the remote.
        """
        self.cmd = resolve_command(self.cmd)
        self.local.lock("supervisor")
        self._install_signals()
        if self.contract is not None:  # SageMaker's Downloading: input channels, then checkpoints
            from spotckpt._sagemaker import download_channels

            download_channels(self.contract, self.events)
            self.cmd += self.contract.user_args()
        if self.cfg.remote:
            self.store = open_remote(self.cfg.remote, self.cfg.storage_options)
            if not self.do_pull:  # before the claim: a refused start must not stop the newer instance
                check_not_stale(self.local, self.store, "spotckpt run --no-pull", "Start it without "
                                "--no-pull (the pull keeps what it replaces in the state dir)")
            fence = claim(self.store)
            self.events.emit("claimed", generation=fence.generation, enforced=fence.enforced)
            self.syncer = Syncer(self.local, self.store, keep_last=self.cfg.keep_last,
                                 events=self.events, scan_interval=self.scan_interval,
                                 gate=self.gate, rules=self.rules, fence=fence)
            if self.do_pull:
                res = pull(self.local, self.store, events=self.events, ranked=False)
                log.info("spotckpt run: pulled from %s: %s", self.cfg.remote, res.describe())
                if res.step is not None:
                    self._submitted = res.step
                self._ranked = res.ranked  # the command's ranks restore it; one process may not
            assert self.syncer.fence is not None
            self.history = _history.begin(self.store, self.syncer.fence, self.syncer, self.local, self.events)
        else:
            self.local.clean_temp()
            log.warning("spotckpt run: no remote (set --remote or SPOTCKPT_REMOTE): "
                        "checkpoints stay in %s only", self.cfg.local_dir)
        self.engine = Engine(self.local, syncer=self.syncer, keep_last=self.cfg.keep_last,
                             events=self.events)

    # -- signals ---------------------------------------------------------------------------
    def _install_signals(self) -> None:
        for sig in self.notice_signals:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # the main loop forwards it; the deadline runs from now, not from when it is taken
        # (the pull at start may take a while: a SIGTERM there must not get a longer grace)
        self._pending_signals.append((signum, self.clock()))

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _take_signals(self) -> None:
        while self._pending_signals:
            sig, at = self._pending_signals.pop(0)
            name = signal.Signals(sig).name
            now = self.clock()
            if self.deadline is not None:
                # SIGTERM twice, Ctrl-C after a SIGTERM: the command has its notice and the
                # deadline stands; a second signal could only cut the save it is making.
                log.warning("spotckpt run: %s: already interrupted by %s (deadline in %.1f s); not "
                            "forwarded", name, self.notice_source, self.deadline - now)
                self.events.emit("signal_repeated", signal=name, seconds_left=round(self.deadline - now, 2))
                continue
            self.notice_at, self.deadline, self.notice_source = at, at + self.cfg.grace_seconds, name
            if self.leave_by_deadline:
                _exit.arm(self.deadline, EXIT_INTERRUPTED, clock=self.clock)
            self.events.emit("notice", source=name, by="supervisor", seconds_left=round(self.deadline - now, 2))
            if self.child is None or self.child.poll() is not None:
                continue
            procs = pt.targets(self.child.pid, self.scope)
            self._confirm_alive(snapshot=True)  # what it closed before our signal, it closed alive
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
        if self.syncer is not None:  # also for a notice before the start: it uploads what we have
            self.syncer.start()
            if self._submitted is not None:
                self.syncer.submit(self._submitted)
        if self._pending_signals:  # a notice while pulling: do not start the command
            log.warning("spotckpt run: %s before the command started; not starting it; uploading "
                        "what the local dir holds", signal.Signals(self._pending_signals[0][0]).name)
            self._take_signals()
            return self._finish(None)
        self._wake = Wakeup(self.local.root)  # signals, the child's exit, changes, the gate
        self.gate.on_wait = self._wake.poke
        env = dict(os.environ, SPOTCKPT_SUPERVISED="1", SPOTCKPT_LOCAL_DIR=str(self.cfg.local_dir),
                   SPOTCKPT_GRACE_SECONDS=str(self.cfg.grace_seconds),
                   SPOTCKPT_KEEP_LAST=str(self.cfg.keep_last),
                   SPOTCKPT_SIGNALS=",".join(signal.Signals(s).name for s in self.notice_signals))
        if self.cfg.remote:
            env["SPOTCKPT_REMOTE"] = self.cfg.remote
        env[SUPERVISOR_ENV] = self._describe()
        if self.contract is not None:
            env.update(self.contract.env(env))
        try:  # own process group, parent-death signal, lifeline: see _child
            self._child = Child.start(self.cmd, env)
        except OSError as e:
            self._finish(None)
            raise ConfigError(f"spotckpt: cannot start {self.cmd[0]!r}: {e.strerror or e}") from None
        self.child = self._child.proc
        self._wake.watch_child(self.child.pid)
        self.events.emit("child_start", pid=self.child.pid, cmd=self.cmd)
        log.info("spotckpt run: started %s (pid %d)", " ".join(self.cmd), self.child.pid)
        rc = self._supervise()
        return self._finish(rc)

    def _describe(self) -> str:
        """``SPOTCKPT_SUPERVISOR`` for the command: the dir we watch and upload, our remote,
        and the generation we claimed, which the ranks of a torch.distributed command share
        (they upload their own parts: :mod:`spotckpt._checkpointer._supervised`)."""
        doc: dict[str, Any] = {"dir": os.path.realpath(self.cfg.local_dir), "remote": self.cfg.remote}
        fence = self.syncer.fence if self.syncer is not None else None
        if fence is not None:
            doc.update(generation=fence.generation, previous=fence.previous, enforced=fence.enforced)
        if self._ranked is not None:
            doc["ranked"] = self._ranked
        return json.dumps(doc, sort_keys=True)

    def _supervise(self) -> int:
        """Poll the command whenever something happens (a signal, its exit, a change in the
        local dir, the watcher asking: :mod:`._wakeup`), at most every ``poll`` s for
        changes, and at least every ``_IDLE`` s (every ``poll`` s without change events or
        after a notice)."""
        assert self.child is not None and self._wake is not None
        while True:
            t0 = time.monotonic()
            self._take_signals()
            rc = self._confirm_alive()
            if rc is not None:
                self.gate.ended_with(rc == 0)
                return rc
            if self.syncer is not None and self.syncer.stale is not None:  # a newer instance took over
                pt.send(pt.tree(self.child.pid), signal.SIGKILL)
                return self.child.wait()
            if self.syncer is not None and self.syncer.watcher is not None:
                self.syncer.watcher.beat()
            self._scan()
            pt.reap(exclude=self.child.pid)
            if self.deadline is not None and not self.killed and self.clock() >= self._kill_at():
                self._kill_child()
            woke = self._wake.wait(self._pause())
            if woke == {"change"}:  # a busy writer: at most one poll per `poll` s
                time.sleep(max(0.0, t0 + self.poll - time.monotonic()))

    def _pause(self) -> float:
        if self.deadline is not None:
            return self.poll if self.killed else max(0.0, min(self.poll, self._kill_at() - self.clock()))
        assert self._wake is not None
        return _IDLE if self._wake.sees_changes else self.poll

    def _confirm_alive(self, *, snapshot: bool = False) -> int | None:
        """Poll the command; while it runs, tell the writer gate it was alive now and which
        files its tree holds open for writing (taken before the poll, so a file closed
        before it was closed by a live writer). Returns the command's exit code, or None."""
        assert self.child is not None
        wall, mono = time.time_ns(), time.monotonic()
        procs = pt.tree(self.child.pid)
        writers = pt.writing_under(procs, self.local.root)
        w = self.syncer.watcher if self.syncer is not None else None
        files = None
        if snapshot and w is not None:  # after the writers scan; only files nobody writes
            files = {k: v for k, v in w.snapshot().items() if k not in writers}
        rc = self.child.poll()
        if rc is None and pt.dying(procs, self.child.pid):
            return None  # killed, its files closing torn: not a sign of life (the next poll sees the end)
        if rc is None:
            self._writers = writers
            self.gate.confirm(mono, wall, writers, files)
        return rc

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
        last save will be about as big) plus the watched dir's backlog (changed files not
        yet committed, as of the watcher's last pass), at the measured upload rate, plus
        overhead."""
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
        size += getattr(s.watcher, "backlog_bytes", 0) or 0
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
        self._confirm_alive(snapshot=True)
        procs = pt.tree(self.child.pid)
        self._writers |= pt.writing_under(procs, self.local.root)
        pt.send(procs, signal.SIGKILL)
        self.killed = True
        left = self.deadline - self.clock()
        log.error("spotckpt run: the command did not exit in time; killed it (SIGKILL) with "
                  "%.1f s left, to leave time for the final upload", left)
        self.events.emit("child_killed", seconds_left=round(left, 2))

