"""``spotckpt spot -- CMD``: SageMaker Managed Spot Training, emulated on this machine.

Process layer. Each start of the job is a new "instance": wait for capacity, empty the
local dir, run ``spotckpt run -- CMD`` (which pulls, supervises and flushes) in its own
session, interrupt it with SIGTERM and SIGKILL after ``--grace`` at the scheduled points
of training time, and start again, until the command completes or a limit is reached.

The vocabulary is SageMaker's (``DescribeTrainingJob``): ``TrainingJobStatus`` InProgress,
Completed, Failed, Stopping, Stopped; ``SecondaryStatus`` Starting, Downloading, Training,
Interrupted, Uploading, Completed, Failed, Stopping, MaxRuntimeExceeded, MaxWaitTimeExceeded.
Timing follows SageMaker's definitions:

- MaxRuntimeInSeconds caps TrainingTimeInSeconds, the seconds instances ran (all starts).
- MaxWaitTimeInSeconds caps the wall-clock time from job creation, capacity waits and
  interruptions included; it must be larger than MaxRuntimeInSeconds.
- BillableTimeInSeconds is TrainingTimeInSeconds at the spot price, so
  savings = (1 - Billable / Training) * 100, as SageMaker reports it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from spotckpt._commit import state_dir
from spotckpt._config import _UNSET, Config, require_dir
from spotckpt._errors import ConfigError
from spotckpt._supervisor import resolve_command
from spotckpt._sync import open_remote

from . import _traces
from ._args import _floats, interruption_schedule  # noqa: F401 - (imported from here by the tests)
from ._instance import InstanceML
from ._report import Job, _Events


class SpotEmulator:
    """The job's lifecycle; :meth:`run` returns the exit status (0 only for Completed)."""

    def __init__(self, cmd: list[str], args: argparse.Namespace) -> None:
        self.cmd, self.args = cmd, args
        self.max_run = args.max_run
        self.max_wait = args.max_wait if args.max_wait is not None else 2 * args.max_run
        if not self.max_run > 0:
            raise ConfigError("spotckpt spot: --max-run must be a positive number of seconds")
        if not self.max_wait > self.max_run:
            raise ConfigError(f"spotckpt spot: --max-wait ({self.max_wait:g}) must be larger than --max-run "
                              f"({self.max_run:g}): it is the time for capacity waits plus the run "
                              "(MaxWaitTimeInSeconds > MaxRuntimeInSeconds)")
        if not 0 <= args.spot_discount < 1:
            raise ConfigError("spotckpt spot: --spot-discount must be in [0, 1), e.g. 0.7 for 70% off")
        if args.grace <= 0:
            raise ConfigError("spotckpt spot: --grace must be a positive number of seconds")
        self.waits = _floats("--capacity-wait", args.capacity_wait, allow_inf=True) or [0.0]
        if args.no_notice > 0 and not (args.interrupt_rate > 0 or args.advisor_band):
            raise ConfigError("spotckpt spot: --no-notice applies to --interrupt-rate and --advisor-band; "
                              "give one of them (or use --kill-at / --kill-rate for kills without notice)")
        if args.time_scale != 1.0 and not (args.interrupt_trace or args.advisor_band):
            raise ConfigError("spotckpt spot: --time-scale scales --interrupt-trace and --advisor-band; "
                              "give one of them")
        self.schedule = _traces.schedule(
            at=_floats("--interrupt-at", args.interrupt_at), kill_at=_floats("--kill-at", args.kill_at),
            rate=args.interrupt_rate, kill_rate=args.kill_rate, seed=args.seed, horizon=self.max_run,
            trace=args.interrupt_trace, band=args.advisor_band, scale=args.time_scale, no_notice=args.no_notice)
        self.cmd = resolve_command(cmd)
        name = args.job_name or time.strftime("spotckpt-%Y%m%d-%H%M%S")
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"{name}-")).absolute()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"spotckpt spot: --workdir {self.workdir}: {e.strerror or e}") from None
        self.json_out = sys.stderr if args.json else sys.stdout
        self.ml = InstanceML.from_args(args, self.workdir, name, self.json_out)  # SageMaker's contract
        self.local_dir = (self.ml.local_dir if self.ml else Path(args.local_dir or self.workdir / "checkpoints")).absolute()
        require_dir(self.local_dir)  # a file: one line, exit 2
        if args.local_dir and self.local_dir.exists() and any(self.local_dir.iterdir()):
            raise ConfigError(f"spotckpt spot: --local-dir {self.local_dir} is not empty; each start of "
                              "the emulated job empties it, as a new instance would: give an empty dir")
        remote = args.remote or os.environ.get("SPOTCKPT_REMOTE") or f"file://{self.workdir / 'remote'}/"
        self.cfg = Config.resolve(local_dir=self.local_dir, remote=remote if remote else _UNSET, check_local=True)
        open_remote(self.cfg.remote, self.cfg.storage_options)  # unreachable: one line, exit 2, now
        self.report_path = Path(args.report or self.workdir / "describe-training-job.json")
        # With --json, stdout carries the report alone: status lines and the command's own
        # output go to stderr.
        self.out = self.json_out
        inside = str(self.ml.contract.ml_root / "checkpoints") if self.ml else str(self.local_dir)
        self.job = Job(name, self.max_run, self.max_wait, self.cfg.remote, inside,
                       args.spot_discount, out=self.out, extra=self.ml.describe() if self.ml else None)
        self.proc: subprocess.Popen | None = None
        self._stop_requested: str | None = None

    # -- helpers ---------------------------------------------------------------------------
    def _state_dir(self) -> Path:
        """The instance's spotckpt state dir, as its `spotckpt run` finds it (with the
        contract, in the instance's own /opt/ml whatever SPOTCKPT_STATE_DIR says)."""
        return state_dir(self.local_dir, env=self.ml.env() if self.ml else None)

    def _now(self) -> float:
        return time.monotonic()

    def _over_wait(self) -> bool:
        return self._now() - self.job.t0 >= self.max_wait

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested = signal.Signals(signum).name

    def _start_container(self) -> _Events:
        # A new instance: an empty local dir, and none of the last one's spotckpt state
        # (its events log, locks, mirror state) either.
        state = self._state_dir()
        for d in (self.local_dir, state):
            if d.exists():
                shutil.rmtree(d)
        if self.ml:
            self.ml.fresh()  # and a fresh /opt/ml
        self.local_dir.mkdir(parents=True, exist_ok=True)
        a = self.args
        argv = [sys.executable, "-m", "spotckpt", "run",
                *(self.ml.run_args() if self.ml else ["--local-dir", str(self.local_dir)]),
                "--remote", str(self.cfg.remote), "--grace", str(a.grace),
                "--scan-interval", str(a.scan_interval),
                *[x for r in a.dir_checkpoint for x in ("--dir-checkpoint", r)], "--", *self.cmd]
        self.proc = subprocess.Popen(self.ml.wrap(argv) if self.ml else argv, start_new_session=True,
                                     stdout=sys.stderr if self.args.json else None,  # a "container": own session
                                     env=self.ml.env() if self.ml else None)
        return _Events(state / "events.jsonl")

    def _kill_container(self) -> None:
        """SIGKILL everything in the container's session, like a terminated instance."""
        assert self.proc is not None
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()

    def _terminate_container(self, events: _Events, attempt: dict[str, Any]) -> tuple[int, bool]:
        """SIGTERM the supervisor, SIGKILL the container after the grace. Returns (status, killed)."""
        assert self.proc is not None
        attempt["notice_wall"] = time.time()  # the interruption, for the work-lost accounting
        self.proc.send_signal(signal.SIGTERM)
        end = self._now() + self.args.grace
        while self.proc.poll() is None and self._now() < end:
            self._absorb(events.new(), attempt)
            time.sleep(0.05)
        killed = self.proc.poll() is None
        attempt["NoticeToExitSeconds"] = round(self.args.grace - max(0.0, end - self._now()), 3)
        self._kill_container()  # the instance is gone: its leftovers too
        self._absorb(events.new(), attempt)
        rc = self.proc.returncode
        return (128 - rc if rc < 0 else rc), killed

    def _absorb(self, evs: list[dict[str, Any]], attempt: dict[str, Any]) -> None:
        for e in evs:
            kind = e.get("event")
            self.job.record(e)  # saves and uploads: what state is durable, captured when
            if kind == "pull":
                attempt["ResumedFromStep"] = e.get("step")
                attempt["PulledFiles"] = e.get("files")
                last = self.job.interruptions[-1] if self.job.interruptions else None
                if last is not None and last["Attempt"] == attempt["Number"] - 1:
                    last["ResumedFromStep"] = e.get("step")
            elif kind == "child_start":
                attempt["child_started"] = True
                attempt["command_start"] = e.get("ts")
            elif kind == "child_exit":
                attempt["child_exited"] = True
                # The command's own status; ExitStatus is the container's (`spotckpt run`:
                # 143 after a notice whatever the command returned).
                attempt["CommandExitStatus"] = e.get("status")
            elif kind == "notice" and e.get("step") is not None:
                attempt["StepAtNotice"] = e.get("step")
            elif kind == "upload_done":
                attempt["DurableStep"] = max(e.get("step", -1), attempt.get("DurableStep") or -1)
            elif kind == "channel_download":
                attempt.setdefault("Channels", {})[e.get("channel")] = {"Files": e.get("files"), "Bytes": e.get("bytes")}
            elif kind == "schedule":  # every="auto": the decision in force in this incarnation
                attempt["Schedule"] = {k: e.get(k) for k in ("interval_s", "how", "c_s", "d_s", "rate_per_hour",
                                                              "notice_fits", "overhead", "rework", "fraction_lost",
                                                              "sources", "step")}
                attempt["ScheduleDecisions"] = attempt.get("ScheduleDecisions", 0) + 1
            elif kind == "history_begin":
                attempt["Generation"] = e.get("generation")
            elif kind == "model_uploaded":
                self.job.model_artifacts = e.get("url")
            elif kind == "contract_error":
                attempt["contract_error"] = e.get("message")

    def _checkpointer_opened(self) -> float | None:
        """When the command's Checkpointer took the dir's trainer lock in this attempt (the
        lock file's mtime; None if it never did: a command without one, or a notice during
        its imports). Read before the next start wipes the state dir."""
        state = self._state_dir()
        times = []
        for lock in (state / "trainer.lock", *state.glob("rank-*/trainer.lock")):
            try:
                times.append(lock.stat().st_mtime)
            except OSError:
                pass
        return min(times) if times else None

    def _recorded_history(self) -> dict[str, Any] | None:
        """How each incarnation ended as the job itself recorded it (the remote's
        ``history.json``, every="auto"'s input), or None."""
        from spotckpt._remote import _history

        try:
            doc = _history.read(open_remote(self.cfg.remote, self.cfg.storage_options))
        except Exception:  # noqa: BLE001 - informational only
            return None
        return doc if doc["incarnations"] else None

    # -- the lifecycle ---------------------------------------------------------------------
    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = self._lifecycle()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.proc is not None and self.proc.poll() is None:
                self._kill_container()
        self.job.history = self._recorded_history()
        self.job.finish(self.report_path)
        if self.args.json:
            print(json.dumps(self.job.describe(), indent=1), flush=True)
        return 0 if result == "Completed" else 1

    def _lifecycle(self) -> str:
        job = self.job
        n = 0
        while True:
            wait = self.waits[min(n, len(self.waits) - 1)]
            msg = ("Launching requested ML instances" if n == 0
                   else "Restarting the training job after a spot interruption")
            if wait > 0:
                msg += f"; waiting for spot capacity ({'never available' if math.isinf(wait) else f'{wait:g} s'})"
            job.status("InProgress", "Starting", msg)
            end = self._now() + wait
            while self._now() < end:
                if self._over_wait():
                    return self._stop("MaxWaitTimeExceeded")
                if self._stop_requested:
                    return self._stop("Stopped")
                time.sleep(min(0.05, max(0.0, end - self._now())))
            if self._over_wait():
                return self._stop("MaxWaitTimeExceeded")
            outcome = self._attempt(n, wait)
            if outcome != "Interrupted":
                return outcome
            n += 1

    def _attempt(self, n: int, wait: float) -> str:
        job = self.job
        attempt: dict[str, Any] = {"Number": n + 1, "CapacityWaitSeconds": None if math.isinf(wait) else wait,
                                   "StartTime": job.iso(time.time())}
        job.attempts.append(attempt)
        events = self._start_container()
        started = self._now()
        job.status("InProgress", "Downloading", self.ml.downloading(self.cfg.remote) if self.ml else
                   f"Downloading checkpoints from {self.cfg.remote} to {self.local_dir}")
        trained_before, train_t0 = job.training_seconds, None
        while True:
            self._absorb(events.new(), attempt)
            now = self._now()
            if train_t0 is None and attempt.get("child_started"):
                train_t0 = now
                step = attempt.get("ResumedFromStep")
                files = attempt.get("PulledFiles") or 0
                what = (f"resumed from checkpoint step {step}" if step is not None else
                        f"resumed from {files} checkpoint file(s)" if files else "no checkpoint to resume from")
                job.status("InProgress", "Training", f"Training in progress ({what})")
            if train_t0 is not None and not attempt.get("uploading") and attempt.get("child_exited"):
                attempt["uploading"] = True
                job.status("InProgress", "Uploading", self.ml.uploading(self.cfg.remote) if self.ml
                           else f"Uploading checkpoints to {self.cfg.remote}")
            if train_t0 is not None and not attempt.get("uploading"):
                job.training_seconds = trained_before + (now - train_t0)
            instance = job.instance_seconds + (now - started)
            rc = self.proc.poll() if self.proc is not None else None
            if rc is not None:
                self._absorb(events.new(), attempt)
                job.instance_seconds = instance
                self._kill_container()  # nothing may outlive the instance
                attempt["checkpointer_opened"] = self._checkpointer_opened()
                attempt["ExitStatus"] = 128 - rc if rc < 0 else rc
                attempt["InstanceSeconds"] = round(now - started, 3)
                if rc == 0:
                    job.status("Completed", "Completed", "Training job completed")
                    return "Completed"
                job.failure = (f"ClientError: {attempt['contract_error']}" if attempt.get("contract_error") else
                               f"AlgorithmError: the command exited with status {attempt['ExitStatus']}")
                job.status("Failed", "Failed", job.failure)
                return "Failed"
            point = self.schedule[0] if self.schedule else None
            if point is not None and train_t0 is not None and job.training_seconds >= point.at:
                self.schedule.pop(0)
                return self._interrupt(attempt, events, started, train_t0, point)
            if instance >= self.max_run:
                job.instance_seconds = instance
                return self._stop("MaxRuntimeExceeded", events, attempt, started)
            if self._over_wait():
                job.instance_seconds = instance
                return self._stop("MaxWaitTimeExceeded", events, attempt, started)
            if self._stop_requested:
                job.instance_seconds = instance
                return self._stop("Stopped", events, attempt, started)
            time.sleep(0.05)

    def _interrupt(self, attempt: dict[str, Any], events: _Events, started: float, train_t0: float,
                   point: _traces.Point) -> str:
        job = self.job
        if point.notice:
            job.status("InProgress", "Interrupted", f"Spot instance interrupted at {point.at:g} s of training "
                       f"({point.source}): SIGTERM sent, {self.args.grace:g} s until SIGKILL")
            status, killed = self._terminate_container(events, attempt)
        else:  # a failure without warning: the instance is gone at once
            job.status("InProgress", "Interrupted", f"Instance lost without warning at {point.at:g} s of "
                       f"training ({point.source}): SIGKILL, no notice")
            attempt["notice_wall"] = time.time()
            self._absorb(events.new(), attempt)
            self._kill_container()
            self._absorb(events.new(), attempt)
            status, killed = 128 + int(signal.SIGKILL), True
        job.instance_seconds += self._now() - started
        attempt.update(ExitStatus=status, Killed=killed, InstanceSeconds=round(self._now() - started, 3))
        attempt["checkpointer_opened"] = self._checkpointer_opened()
        job.interruption(notice=attempt["notice_wall"], attempt=attempt, source=point.source,
                         at_training=point.at, status=status, killed=killed, warned=point.notice)
        return "Interrupted"

    def _stop(self, reason: str, events: _Events | None = None, attempt: dict[str, Any] | None = None,
              started: float | None = None) -> str:
        job = self.job
        self._stop_at = self._now()
        job.status("Stopping", "Stopping", "Stopping the training job")
        if self.proc is not None and self.proc.poll() is None and events is not None and attempt is not None:
            status, killed = self._terminate_container(events, attempt)
            attempt.update(ExitStatus=status, Killed=killed, checkpointer_opened=self._checkpointer_opened())
            if started is not None:  # the instance runs (and bills) until it is gone
                job.instance_seconds += self._now() - self._stop_at
                attempt["InstanceSeconds"] = round(self._now() - started, 3)
        messages = {
            "MaxRuntimeExceeded": f"Training job runtime exceeded MaxRuntimeInSeconds provided ({self.max_run:g} s)",
            "MaxWaitTimeExceeded": f"Training job exceeded MaxWaitTimeInSeconds ({self.max_wait:g} s) "
                                   "waiting for spot capacity or after interruptions",
            "Stopped": f"Training job stopped ({self._stop_requested})",
        }
        job.status("Stopped", reason, messages[reason])
        return reason


def run_spot(args: argparse.Namespace, cmd: list[str]) -> int:
    emu = SpotEmulator(cmd, args)
    print(f"[spot] job {emu.job.name}: workdir {emu.workdir}, remote {emu.cfg.remote}", file=emu.out, flush=True)
    return emu.run()
