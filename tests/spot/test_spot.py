"""`spotckpt spot`: each managed-spot lifecycle path, with real processes and signals.

The job is a tiny pure-Python loop under a Checkpointer (no torch import, so each start
takes a fraction of a second); `spotckpt spot` runs it through `spotckpt run` per start.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_env
from proc_helpers import PY, run, spotckpt
from spotckpt._spot._spot import interruption_schedule

JOB = """
import sys, time, spotckpt
steps, sleep = int(sys.argv[1]), float(sys.argv[2])
state = {"w": [0]}
with spotckpt.Checkpointer(state, every_steps=5) as ck:
    print("resumed at", ck.restored_step, flush=True)
    for step in ck.steps(total=steps):
        state["w"] = [state["w"][0] + step]
        time.sleep(sleep)
print("final", state["w"][0], flush=True)
"""

STATUS = re.compile(r"^\[spot\s+[\d.]+s\] (\S+)\s+(\S+)\s+(.*)$")


def _spot(tmp_path: Path, *opts: str, steps: int = 40, sleep: float = 0.1, remote: str | None = None,
          timeout: float = 60) -> tuple[int, list[tuple[str, str]], dict, str]:
    (tmp_path / "job.py").write_text(JOB)
    wd = tmp_path / "wd"
    args = ["--workdir", str(wd), "--grace", "5", "--capacity-wait", "0.2", *opts]
    if remote:
        args += ["--remote", remote]
    r = run(spotckpt("spot", *args, "--", PY, str(tmp_path / "job.py"), str(steps), str(sleep)),
            env=run_env(), timeout=timeout)
    statuses = [(m.group(1), m.group(2)) for m in map(STATUS.match, r.stdout.splitlines()) if m]
    report = json.loads((wd / "describe-training-job.json").read_text())
    assert [t["Status"] for t in report["SecondaryStatusTransitions"]] == [s for _, s in statuses]
    for t in report["SecondaryStatusTransitions"]:
        assert t["StartTime"] and t["EndTime"] and t["StatusMessage"]
    return r.returncode, statuses, report, r.stdout + r.stderr


def _secondary(statuses: list[tuple[str, str]]) -> list[str]:
    return [s for _, s in statuses]


RUN = ["Starting", "Downloading", "Training"]


def test_no_interruption_completes(tmp_path: Path, s3_remote: str) -> None:
    rc, st, rep, out = _spot(tmp_path, "--max-run", "60", remote=s3_remote, steps=20)
    assert rc == 0, out
    assert _secondary(st) == [*RUN, "Uploading", "Completed"]
    assert {p for p, _ in st[:-1]} == {"InProgress"} and st[-1][0] == "Completed"
    assert rep["TrainingJobStatus"] == "Completed" and rep["SecondaryStatus"] == "Completed"
    assert rep["InterruptionCount"] == 0 and rep["Interruptions"] == []
    t, b = rep["TrainingTimeInSeconds"], rep["BillableTimeInSeconds"]
    assert t >= 2 and b == round(t * 0.3)
    assert rep["ManagedSpotTrainingSavingsPercent"] == round((1 - b / t) * 100, 1)
    assert "final 190" in out                       # sum(range(20)): the loop ran exactly once through
    assert "Training seconds:" in out and "Billable seconds:" in out


@pytest.mark.slow
def test_one_interruption_resumes_from_the_saved_step(tmp_path: Path, s3_remote: str) -> None:
    # at 3 s of training time the job is surely inside its loop, even when a loaded machine
    # takes seconds to start Python (at 1.5 s the notice could precede the Checkpointer)
    rc, st, rep, out = _spot(tmp_path, "--max-run", "60", "--interrupt-at", "3", remote=s3_remote, steps=80)
    assert rc == 0, out
    assert _secondary(st) == [*RUN, "Interrupted", *RUN, "Uploading", "Completed"]
    (i,) = rep["Interruptions"]
    assert i["StepAtNotice"] is not None and i["StepAtNotice"] > 0
    assert i["ResumedFromStep"] == i["StepAtNotice"] == i["DurableStep"]
    assert i["LostSteps"] == 0 and i["LostSeconds"] < 1.0
    assert i["ExitStatus"] == 143 and i["KilledAfterGrace"] is False
    assert "final 3160" in out                      # sum(range(80)): nothing skipped, nothing twice
    assert len(rep["Attempts"]) == 2
    assert rep["Attempts"][0]["CommandExitStatus"] == 143   # the Checkpointer's interruption exit
    assert rep["Attempts"][1]["ExitStatus"] == rep["Attempts"][1]["CommandExitStatus"] == 0


@pytest.mark.slow
def test_two_interruptions(tmp_path: Path) -> None:
    rc, st, rep, out = _spot(tmp_path, "--max-run", "60", "--interrupt-at", "1,2.5")  # default file:// remote
    assert rc == 0, out
    assert _secondary(st) == [*RUN, "Interrupted", *RUN, "Interrupted", *RUN, "Uploading", "Completed"]
    assert rep["InterruptionCount"] == 2
    a, b = rep["Interruptions"]
    assert 0 < a["ResumedFromStep"] < b["ResumedFromStep"]
    assert a["AtTrainingSeconds"] == 1 and b["AtTrainingSeconds"] == 2.5
    assert "final 780" in out


def test_never_launched_stops_at_max_wait(tmp_path: Path) -> None:
    rc, st, rep, out = _spot(tmp_path, "--max-run", "1", "--max-wait", "2", "--capacity-wait", "inf")
    assert rc == 1, out
    assert st == [("InProgress", "Starting"), ("Stopping", "Stopping"), ("Stopped", "MaxWaitTimeExceeded")]
    assert rep["TrainingJobStatus"] == "Stopped" and rep["SecondaryStatus"] == "MaxWaitTimeExceeded"
    assert rep["TrainingTimeInSeconds"] == 0 and rep["BillableTimeInSeconds"] == 0
    assert rep["Attempts"] == []


@pytest.mark.slow
def test_interrupted_then_no_capacity_exceeds_max_wait(tmp_path: Path) -> None:
    rc, st, rep, out = _spot(tmp_path, "--max-run", "8", "--max-wait", "9", "--interrupt-at", "1",
                             "--capacity-wait", "0.2,60", steps=200)
    assert rc == 1, out
    assert _secondary(st) == [*RUN, "Interrupted", "Starting", "Stopping", "MaxWaitTimeExceeded"]
    assert st[-1][0] == "Stopped" and rep["TrainingJobStatus"] == "Stopped"
    assert rep["InterruptionCount"] == 1 and rep["TrainingTimeInSeconds"] >= 1


def test_max_runtime_exceeded_stops_with_sigterm_and_saves(tmp_path: Path) -> None:
    rc, st, rep, out = _spot(tmp_path, "--max-run", "3", "--max-wait", "30", steps=200)
    assert rc == 1, out
    assert _secondary(st) == [*RUN, "Stopping", "MaxRuntimeExceeded"]
    assert st[-2] == ("Stopping", "Stopping") and st[-1] == ("Stopped", "MaxRuntimeExceeded")
    assert rep["TrainingJobStatus"] == "Stopped" and rep["SecondaryStatus"] == "MaxRuntimeExceeded"
    assert 3 <= rep["TrainingTimeInSeconds"] <= 6
    assert "durable at" in out                      # the SIGTERM save reached the remote
    assert rep["Attempts"][0]["ExitStatus"] == 143


def test_a_command_that_exits_0_when_interrupted_is_interrupted_not_completed(tmp_path: Path) -> None:
    """Lightning exits 0 on SIGTERM: `spotckpt run` still exits 143, so the emulated job is
    interrupted and restarted, not Completed after the first start."""
    (tmp_path / "zero.py").write_text(
        "import os, signal, sys, time\n"
        "done = os.path.join(os.environ['SPOTCKPT_LOCAL_DIR'], 'done')\n"
        "if os.path.exists(done):\n"
        "    print('second start: done', flush=True); sys.exit(0)\n"
        "def stop(s, f):\n"
        "    open(done, 'w').close(); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "time.sleep(60)\n")
    r = run(spotckpt("spot", "--workdir", str(tmp_path / "wd"), "--max-run", "60", "--grace", "5",
                     "--capacity-wait", "0", "--interrupt-at", "1", "--stable-seconds", "0.2",
                     "--", PY, str(tmp_path / "zero.py")), env=run_env(), timeout=90)
    rep = json.loads((tmp_path / "wd" / "describe-training-job.json").read_text())
    assert r.returncode == 0, r.stdout + r.stderr
    assert rep["InterruptionCount"] == 1 and len(rep["Attempts"]) == 2
    first = rep["Attempts"][0]
    assert first["ExitStatus"] == 143 and first["CommandExitStatus"] == 0
    assert "second start: done" in r.stdout


def test_failed_command_is_failed_not_completed(tmp_path: Path) -> None:
    (tmp_path / "fail.py").write_text("import sys; print('boom'); sys.exit(3)")
    r = run(spotckpt("spot", "--workdir", str(tmp_path / "wd"), "--max-run", "30", "--capacity-wait", "0",
                     "--json", "--", PY, str(tmp_path / "fail.py")), env=run_env(), timeout=60)
    assert r.returncode == 1
    rep = json.loads((tmp_path / "wd" / "describe-training-job.json").read_text())
    assert rep["TrainingJobStatus"] == "Failed" and "status 3" in rep["FailureReason"]
    # --json: stdout is the report and nothing else (it used to carry the status lines and
    # the command's own output before it); those go to stderr
    assert json.loads(r.stdout) == rep, r.stdout
    assert "boom" in r.stderr and "[spot" in r.stderr and "Failed" in r.stderr


def test_interrupt_rate_schedule_is_seeded_and_bounded() -> None:
    a = interruption_schedule([], 60.0, 7, 3600.0)
    assert a == interruption_schedule([], 60.0, 7, 3600.0)
    assert a != interruption_schedule([], 60.0, 8, 3600.0)
    assert 30 <= len(a) <= 100 and all(0 < t < 3600 for t, _ in a)   # about 60 per hour
    mixed = interruption_schedule([5.0], 3600.0, 1, 10.0)
    assert (5.0, "interrupt-at") in mixed and mixed == sorted(mixed)


@pytest.mark.parametrize("opts, needle", [
    (["--max-run", "60", "--max-wait", "60"], "must be larger than --max-run"),
    (["--max-run", "60", "--max-wait", "30"], "must be larger than --max-run"),
    (["--interrupt-at", "soon"], "not a number"),
    (["--bogus-option"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, opts: list[str], needle: str) -> None:
    r = run(spotckpt("spot", "--workdir", str(tmp_path / "wd"), *opts, "--", "true"), env=run_env())
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert "[spot" not in r.stdout


# -- issue 14 item 8: the accounting of early interruptions --------------------------------
EARLY = """
import os, signal, sys, time
first = not os.path.exists(sys.argv[1])
open(sys.argv[1], "a").close()
if first and sys.argv[2] == "imports":
    time.sleep(120)         # the first start is still "importing" (no handler: SIGTERM kills it)
import spotckpt
state = {"w": [0]}
with spotckpt.Checkpointer(state, every_steps=5) as ck:
    if first and sys.argv[2] == "before-first-step":
        while not ck.should_stop:   # the notice comes while the Checkpointer is open, before step 1
            time.sleep(0.01)
    for step in ck.steps(total=10):
        state["w"] = [state["w"][0] + step]
print("final", state["w"][0], flush=True)
"""


@pytest.mark.parametrize("where", ["imports", "before-first-step"])
def test_interruption_before_the_first_step_found_nothing_to_save(tmp_path: Path, where: str) -> None:
    """A notice during the command's imports, or before its first step: nothing was trained
    in that start, so nothing is lost (it used to say StepAtNotice null and count the start-up
    as lost training)."""
    (tmp_path / "early.py").write_text(EARLY)
    wd = tmp_path / "wd"
    r = run(spotckpt("spot", "--workdir", str(wd), "--grace", "10", "--capacity-wait", "0",
                     "--max-run", "60", "--interrupt-at", "0.5",
                     "--", PY, str(tmp_path / "early.py"), str(tmp_path / "started"), where),
            env=run_env(), timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((wd / "describe-training-job.json").read_text())
    (i,) = rep["Interruptions"]
    assert i["NothingToSave"] is True, i
    assert i["StepAtNotice"] == 0 and i["LostSteps"] == 0 and i["LostSeconds"] == 0.0, i
    assert i["SecondsSinceStart"] >= 0.5          # what the start-up cost, not lost training
    assert rep["WorkLostSeconds"] == 0.0
    assert "#1: nothing to save (before the first step" in r.stdout
    assert "final 45" in r.stdout


SAVE_THEN_DIE = """
import os, signal, sys, time
import spotckpt

class Slow:                 # its state_dict() takes 0.6 s: the manifest is written well after
    n = 0                   # the state was captured
    def state_dict(self):
        time.sleep(0.6)
        return {"n": self.n}
    def load_state_dict(self, d):
        self.n = d["n"]

state = {"slow": Slow(), "w": [0]}
first = not os.path.exists(sys.argv[1])
open(sys.argv[1], "a").close()
with spotckpt.Checkpointer(state, every_steps=10**6) as ck:
    if first:
        ck.step = 3
        print("captured", repr(time.time()), flush=True)
        ck.save(blocking=True)
        if ck.should_stop:
            print("the notice came before the save: the test is void", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # the next notice kills it: no save
        print("saved", flush=True)
        time.sleep(120)
    for step in ck.steps(total=5):
        pass
print("done at", ck.step, flush=True)
"""


@pytest.mark.slow
def test_lost_seconds_count_from_when_the_durable_state_was_captured(tmp_path: Path) -> None:
    """LostSeconds = notice - the time the newest durable state was captured (its snapshot),
    not the manifest's time (written after the snapshot and the write: it hid lost work)."""
    import datetime as dt

    (tmp_path / "die.py").write_text(SAVE_THEN_DIE)
    wd = tmp_path / "wd"
    r = run(spotckpt("spot", "--workdir", str(wd), "--grace", "10", "--capacity-wait", "0",
                     "--max-run", "60", "--interrupt-at", "4",
                     "--", PY, str(tmp_path / "die.py"), str(tmp_path / "started")),
            env=run_env(), timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    captured = float(re.search(r"^captured (\S+)$", r.stdout, re.M).group(1))
    rep = json.loads((wd / "describe-training-job.json").read_text())
    (i,) = rep["Interruptions"]
    notice = dt.datetime.fromisoformat(i["Time"]).timestamp()
    assert i["DurableStep"] == 3 and i["ResumedFromStep"] == 3 and i["NothingToSave"] is False, i
    assert abs(i["LostSeconds"] - (notice - captured)) < 0.2, (i, notice - captured)
    assert i["LostSeconds"] < i["SecondsSinceStart"]
    assert "done at 5" in r.stdout
