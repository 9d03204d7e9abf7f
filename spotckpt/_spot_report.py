"""The emulated job's record: status changes as printed, and the DescribeTrainingJob JSON."""
from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ._local import write_atomic


class Job:
    """Status transitions, times and interruptions of one emulated managed-spot job."""

    def __init__(self, name: str, max_run: float, max_wait: float, remote: str | None,
                 local_dir: str, discount: float, *, out: TextIO | None = None) -> None:
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
        self.state_time: float | None = None  # wall time of the newest durable state
        self.interruptions: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.failure: str | None = None
        self.ended: float | None = None

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
            "Interruptions": self.interruptions,
            "WorkLostSeconds": round(sum(i.get("LostSeconds") or 0 for i in self.interruptions), 2),
            "Attempts": [{k: v for k, v in a.items() if k[0].isupper()} for a in self.attempts],
        }
        if self.failure:
            d["FailureReason"] = self.failure
        return d

    def finish(self, path: Path) -> None:
        """Write the JSON report and print the SageMaker SDK's closing summary."""
        d = self.describe()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(d, indent=1).encode())
        lost = ", ".join(f"#{i['Number']}: {i['LostSeconds']:g} s" + (f" / {i['LostSteps']} steps"
                                                                       if i.get("LostSteps") is not None else "")
                         for i in self.interruptions) or "none"
        pct = "n/a" if d["ManagedSpotTrainingSavingsPercent"] is None else f"{d['ManagedSpotTrainingSavingsPercent']}%"
        print(f"[spot] {d['TrainingJobStatus']} ({d['SecondaryStatus']})\n"
              f"Training seconds: {d['TrainingTimeInSeconds']}\n"
              f"Billable seconds: {d['BillableTimeInSeconds']}\n"
              f"Managed Spot Training savings: {pct}\n"
              f"Interruptions: {d['InterruptionCount']} (work lost: {lost})\n"
              f"Report: {path}", file=self.out, flush=True)
