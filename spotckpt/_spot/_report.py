"""The emulated job's record: status changes as printed, and the DescribeTrainingJob JSON.

Work lost at an interruption is accounted from the events of the attempt (``events.jsonl``):

- the *state time* of a durable save is when its state was captured: a checkpoint's snapshot
  (its ``saved`` event: end of the write minus the write and snapshot seconds; the manifest's
  ``created`` is after the write), a watched-dir file's mtime as uploaded, counted once a file
  set naming it is committed;
- ``LostSeconds`` = notice time - max(state time of the newest durable save, start of the
  command in this attempt): 0 when the interruption save was durable (it was captured after
  the notice);
- an interruption before the first step of the attempt (the notice came while the command
  imported, or while its Checkpointer restored, or before its first step ended) found nothing
  to save: ``NothingToSave`` is true and no training is counted as lost
  (``SecondsSinceStart`` says how much start-up time it cost). The emulator knows a
  Checkpointer command had not opened its Checkpointer from the trainer lock of the attempt's
  state dir; for a command with no Checkpointer it cannot see steps (``NothingToSave`` null).
"""
from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from spotckpt._commit import write_atomic


class _Events:
    """Reads one attempt's events.jsonl as it grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.buf = path, 0, ""

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                data = f.read()
                self.offset = f.tell()
        except OSError:
            return []
        self.buf += data
        *lines, self.buf = self.buf.split("\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


class Job:
    """Status transitions, times and interruptions of one emulated managed-spot job."""

    def __init__(self, name: str, max_run: float, max_wait: float, remote: str | None,
                 local_dir: str, discount: float, *, out: TextIO | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        self.name, self.max_run, self.max_wait = name, max_run, max_wait
        self.remote, self.local_dir, self.discount = remote, local_dir, discount
        self.out = out or sys.stdout
        self.t0 = time.monotonic()
        self.created = time.time()
        self.primary = "InProgress"
        self.secondary: str | None = None
        self.transitions: list[dict[str, Any]] = []
        self.training_seconds = 0.0   # seconds in Training, all starts (the --interrupt-at clock)
        self.instance_seconds = 0.0   # seconds instances ran: TrainingTimeInSeconds
        self.training_start: float | None = None
        self.captured: dict[int, float] = {}   # step -> wall time its state was captured
        self.durable: dict[int, float] = {}    # step -> its manifest's created (fallback)
        self.mirror_uploaded: float | None = None  # newest mtime uploaded, not yet in a set
        self.mirror_durable: float | None = None   # newest mtime in a committed file set
        self.interruptions: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.failure: str | None = None
        self.ended: float | None = None
        self.extra = extra or {}   # the SageMaker contract's fields (HyperParameters, InputDataConfig...)
        self.model_artifacts: str | None = None   # model.tar.gz's URL, once uploaded
        self.history: dict[str, Any] | None = None  # the job's own history.json, at the end

    def record(self, e: dict[str, Any]) -> None:
        """Take note of a save or upload event of the attempt's events log."""
        kind = e.get("event")
        if kind == "saved" and e.get("step") is not None and e.get("ts"):
            self.captured[int(e["step"])] = (float(e["ts"]) - float(e.get("write_s") or 0)
                                            - float(e.get("snapshot_s") or 0))
        elif kind == "upload_done" and e.get("step") is not None:
            self.durable[int(e["step"])] = float(e.get("created") or 0.0)
        elif kind == "mirror_upload" and (e.get("version_mtime") or e.get("mtime")):
            # the uploaded version's mtime (``mtime`` is the file's when the event was written:
            # a newer version, not durable, if the script rewrote it meanwhile)
            t = float(e.get("version_mtime") or e["mtime"])
            self.mirror_uploaded = max(self.mirror_uploaded or 0.0, t)
        elif kind == "files_committed" and self.mirror_uploaded is not None:
            self.mirror_durable = max(self.mirror_durable or 0.0, self.mirror_uploaded)

    def state_time(self) -> float | None:
        """Wall time at which the newest durable state was captured (None: nothing durable)."""
        times = [self.captured.get(s, c) for s, c in self.durable.items()]
        if self.mirror_durable is not None:
            times.append(self.mirror_durable)
        return max(times) if times else None

    def interruption(self, *, notice: float, attempt: dict[str, Any], source: str, at_training: float,
                     status: int, killed: bool, warned: bool = True) -> dict[str, Any]:
        """Record an interruption; what it lost is resolved in :meth:`describe` (the step the
        next start resumes from, and whether the command uses a Checkpointer, come later)."""
        entry = {
            "Number": len(self.interruptions) + 1, "Time": self.iso(notice), "Source": source,
            "AtTrainingSeconds": round(at_training, 3), "Attempt": attempt["Number"],
            "ExitStatus": status, "KilledAfterGrace": killed and warned, "Notice": warned,
            "ResumedFromStep": None,
            "notice": notice, "state_time": self.state_time(), "attempt": attempt,
            "captured": list(self.captured.values()),
        }
        self.interruptions.append(entry)
        return entry

    def _uses_checkpointer(self) -> bool:
        return any(a.get("checkpointer_opened") is not None or a.get("StepAtNotice") is not None
                   for a in self.attempts)

    def _account(self, i: dict[str, Any], uses_ckpt: bool) -> dict[str, Any]:
        a = i["attempt"]
        start_step = a.get("ResumedFromStep")
        start = a.get("command_start")
        step = a.get("StepAtNotice")   # the step at which the Checkpointer handled the notice
        opened = a.get("checkpointer_opened")
        nothing: bool | None = None
        if step is not None:
            nothing = step == (start_step or 0)
        elif uses_ckpt and (opened is None or opened > i["notice"]):
            nothing, step = True, start_step or 0   # it had not even opened its Checkpointer
        elif start is not None and any(t >= start for t in i["captured"]):
            nothing = False   # it saved in this attempt, then died without handling the notice
        since = None if start is None else max(0.0, i["notice"] - start)
        lost = since
        st = i["state_time"]
        if lost is not None and st is not None:
            lost = max(0.0, min(lost, i["notice"] - st))
        out = {k: v for k, v in i.items() if k[0].isupper()}
        out.update(StepAtNotice=step, DurableStep=a.get("DurableStep"), NothingToSave=nothing,
                   SecondsSinceStart=None if since is None else round(since, 2),
                   LostSeconds=0.0 if nothing else round(lost or 0.0, 2), LostSteps=None)
        if nothing:
            out["LostSteps"] = 0
        elif step is not None and i["ResumedFromStep"] is not None:
            out["LostSteps"] = max(0, int(step) - int(i["ResumedFromStep"]))
        return out

    def accounted(self) -> list[dict[str, Any]]:
        """The interruptions as reported: steps and seconds lost, or nothing to save."""
        uses = self._uses_checkpointer()
        return [self._account(i, uses) for i in self.interruptions]

    @staticmethod
    def iso(ts: float) -> str:
        return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")

    def status(self, primary: str, secondary: str, message: str) -> None:
        """Record and print a status change, as SageMaker's SecondaryStatusTransitions do."""
        now = time.time()
        if self.transitions and self.transitions[-1].get("EndTime") is None:
            self.transitions[-1]["EndTime"] = self.iso(now)
        if secondary == "Downloading" and self.training_start is None:
            self.training_start = now
        self.primary, self.secondary = primary, secondary
        self.transitions.append({"Status": secondary, "StartTime": self.iso(now), "StatusMessage": message})
        if primary in ("Completed", "Failed", "Stopped"):
            self.transitions[-1]["EndTime"] = self.iso(now)
            self.ended = now
        elapsed = time.monotonic() - self.t0
        print(f"[spot {elapsed:7.1f}s] {primary:<10} {secondary:<20} {message}", file=self.out, flush=True)

    def billable_seconds(self) -> int:
        return int(round(round(self.instance_seconds) * (1.0 - self.discount)))

    def describe(self) -> dict[str, Any]:
        training = int(round(self.instance_seconds))
        billable = self.billable_seconds() if training else 0
        savings = round((1 - billable / training) * 100, 1) if training else None
        interruptions = self.accounted()
        d: dict[str, Any] = {
            "TrainingJobName": self.name,
            "TrainingJobArn": f"arn:aws:sagemaker:local:000000000000:training-job/{self.name}",
            "TrainingJobStatus": self.primary,
            "SecondaryStatus": self.secondary,
            "CreationTime": self.iso(self.created),
            "TrainingStartTime": self.iso(self.training_start) if self.training_start else None,
            "TrainingEndTime": self.iso(self.ended) if self.ended and self.training_start else None,
            "LastModifiedTime": self.iso(self.ended or time.time()),
            "EnableManagedSpotTraining": True,
            "StoppingCondition": {"MaxRuntimeInSeconds": self.max_run, "MaxWaitTimeInSeconds": self.max_wait},
            "CheckpointConfig": {"S3Uri": self.remote, "LocalPath": self.local_dir},
            "SecondaryStatusTransitions": self.transitions,
            "TrainingTimeInSeconds": training,
            "BillableTimeInSeconds": billable,
            "SpotDiscount": self.discount,
            "ManagedSpotTrainingSavingsPercent": savings,
            "SavingsFormula": "(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100",
            "SecondsInTraining": round(self.training_seconds, 3),
            "WallClockSeconds": round((self.ended or time.time()) - self.created, 3),
            "InterruptionCount": len(self.interruptions),
            "Interruptions": interruptions,
            "WorkLostSeconds": round(sum(i["LostSeconds"] for i in interruptions), 2),
            "Attempts": [self._attempt(a) for a in self.attempts],
        }
        if self.history is not None:
            t = self.history["totals"]
            d["RecordedHistory"] = {"Incarnations": len(self.history["incarnations"]), "Ended": t["ended"],
                                    "RunSeconds": round(t["run_s"], 3)}
        d.update(self.extra)
        if self.model_artifacts:
            d["ModelArtifacts"] = {"S3ModelArtifacts": self.model_artifacts}
        if self.failure:
            d["FailureReason"] = self.failure
        return d

    def _attempt(self, a: dict[str, Any]) -> dict[str, Any]:
        """One attempt as reported; with the job's history, how the job itself recorded its end."""
        out = {k: v for k, v in a.items() if k[0].isupper()}
        if self.history is not None and a.get("Generation") is not None:
            rec = next((r for r in self.history["incarnations"] if r["generation"] == a["Generation"]), None)
            if rec is not None:
                out["RecordedEnding"] = rec["ended"]
        return out

    def finish(self, path: Path) -> None:
        """Write the JSON report and print the SageMaker SDK's closing summary."""
        d = self.describe()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(d, indent=1).encode())
        lost = ", ".join(_lost_text(i) for i in d["Interruptions"]) or "none"
        pct = "n/a" if d["ManagedSpotTrainingSavingsPercent"] is None else f"{d['ManagedSpotTrainingSavingsPercent']}%"
        print(f"[spot] {d['TrainingJobStatus']} ({d['SecondaryStatus']})\n"
              f"Training seconds: {d['TrainingTimeInSeconds']}\n"
              f"Billable seconds: {d['BillableTimeInSeconds']}\n"
              f"Managed Spot Training savings: {pct}\n"
              f"Interruptions: {d['InterruptionCount']} (work lost: {lost})\n"
              + (f"Model artifact: {self.model_artifacts}\n" if self.model_artifacts else "")
              + "".join(f"{_schedule_text(a)}\n" for a in d["Attempts"] if a.get("Schedule")) +
              f"Report: {path}", file=self.out, flush=True)


def _schedule_text(a: dict[str, Any]) -> str:
    """every="auto" in one attempt: its last decision."""
    s = a["Schedule"]
    rate = s.get("rate_per_hour") or 0.0
    frac = s.get("fraction_lost")
    return (f"Attempt {a['Number']}: every='auto' chose {s.get('interval_s')} s ({s.get('how')}) from C "
            f"{s.get('c_s')} s, time to durable {s.get('d_s')} s, failures without usable warning "
            + (f"1 per {1 / rate:.3g} h" if rate > 0 else "none expected")
            + (f", {100 * frac:.2f}% expected lost" if frac is not None else "")
            + (f" (recorded end: {a['RecordedEnding']})" if a.get("RecordedEnding") else ""))


def _lost_text(i: dict[str, Any]) -> str:
    if i["NothingToSave"]:
        return (f"#{i['Number']}: nothing to save (before the first step, "
                f"{i['SecondsSinceStart'] or 0:g} s after the command started)")
    steps = f" / {i['LostSteps']} steps" if i.get("LostSteps") is not None else ""
    return f"#{i['Number']}: {i['LostSeconds']:g} s{steps}"
