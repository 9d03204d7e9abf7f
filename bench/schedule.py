"""every="auto" against fixed intervals on the same interruption traces (``make bench``,
part ``schedule``; ``python bench/run.py --parts schedule`` alone).

Two kinds of runs, each policy on the same trace:

- **Emulated** (``spotckpt spot``): a real job (``tests/scripts/auto_train.py``: steps that
  sleep, a numpy state) under the real emulator, supervisor and Checkpointer, killed and
  restarted for real on a trace file. Time is scaled so that it runs in minutes: **one
  second stands for four minutes of training** (``SCALE`` = 240); the fixed intervals (1, 5,
  15, 60 min), every="auto"'s bounds (60 s and 2 h) and prior (one failure per 2 h) are
  scaled alike, and the traces are given in seconds of training (``--time-scale 240``).
  What is not scaled is what the machine does: a save's stall, the write and upload, the
  restart (process start, imports, pull: ~2.5 s, so ~10 minutes of training, as a spot
  restart takes), the grace's exit margins (so the grace is 4 s: 16 minutes). Lost time
  of a run = its instance seconds (``TrainingTimeInSeconds``) less those of an uninterrupted
  run without periodic saves started at the same moment (the baseline): overhead + rework +
  restarts. Rework comes from the steps the job logs (steps run more than once), restarts
  from each later start until its first step; the rest is overhead.
- **Replayed** (the month-long AWS Spot Instance Advisor traces, which at one second per
  minute would take 12 hours each): the same policy code (``_autosave._Auto``, its
  ``decide()``, the history's counts) on a virtual clock, with the costs the emulated runs
  measured (C, time to durable, restart, notice flush). The replay is checked against the
  emulated runs on their traces (``replay_check``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from spotckpt._cadence import DEFAULT_MAX_INTERVAL, DEFAULT_MIN_INTERVAL  # noqa: E402
from spotckpt._spot import _traces  # noqa: E402

SCALE = 240.0                   # seconds of training one emulated second stands for
FIXED_MIN = [1, 5, 15, 60]      # the fixed intervals, minutes of training
POLICIES = ["auto", *[f"{m} min" for m in FIXED_MIN]]
JOB_HOURS = 12.0                # the emulated job: 12 h of training (180 s)
STEP_S = 0.1                    # 24 s of training per step
STATE_MB = 64
GRACE = 4.0                     # emulated seconds (16 min: the exit margins are real seconds)
CAP = 2.5                       # a run stops after CAP x the job's training time (its loss is then a lower bound)
PY = sys.executable

# Traces in training time. The emulated ones: Poisson processes (seeded) and one file.
EMULATED = [
    dict(name="kills-2/h", title="failures without warning, 2 per hour", rate=2.0, no_notice=1.0, seed=11),
    dict(name="kills-0.5/h", title="failures without warning, 1 per 2 hours", rate=0.5, no_notice=1.0, seed=12),
    dict(name="spot-2/h", title="spot interruptions with notice, 2 per hour", rate=2.0, no_notice=0.0, seed=13),
    dict(name="mixed-2/h", title="spot interruptions 2 per hour, 1 in 3 without notice", rate=2.0, no_notice=1 / 3,
         seed=14),
    dict(name="burst", title="a trace file: 5 kills in the first 2 hours, then 2 notices",
         points=[(10, False), (25, False), (45, False), (70, False), (100, False), (240, True), (480, True)]),
]
# The replayed ones: a 30-day job on 16 instances (any one interrupted stops it) of each
# advisor band, interruptions with AWS's 2-minute notice; and the bands mixed (each instance
# of a band drawn alike) with 1 in 10 without a usable notice.
MONTH_DAYS = 30
REPLAYED = [dict(name=f"advisor {b}", title=f"30 days on 16 instances, AWS advisor band {b}, notices", band=b,
                 instances=16, no_notice=0.0, seed=20 + i) for i, b in enumerate(_traces.ADVISOR_BANDS)]
REPLAYED += [dict(name="advisor mixed x16", title="30 days on 16 instances, bands mixed, 1 in 10 without notice",
                  band="mixed", instances=16, no_notice=0.1, seed=30)]


def points(trace: dict[str, Any], horizon_s: float) -> list[_traces.Point]:
    """A trace's interruptions, in seconds of training."""
    if "points" in trace:
        return [_traces.Point(m * 60.0, "trace", n) for m, n in trace["points"]]
    rng = random.Random(trace["seed"])
    if "band" in trace:
        pts: list[_traces.Point] = []
        for _ in range(trace.get("instances", 1)):
            pts += _traces.advisor(trace["band"], horizon_s, rng, no_notice=trace["no_notice"])
        return sorted(pts)
    pts = _traces.poisson(trace["rate"], horizon_s, rng, source="trace")
    return [dataclasses.replace(p, notice=rng.random() >= trace["no_notice"]) for p in pts]


# -- emulated runs ---------------------------------------------------------------------------
def _env(policy: str, progress: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPOTCKPT_", "AWS_"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", SPOTCKPT_METADATA="off",
               AUTO_STEPS=str(int(round(JOB_HOURS * 3600 / SCALE / STEP_S))), AUTO_STEP_S=str(STEP_S),
               AUTO_STATE_MB=str(STATE_MB), AUTO_PROGRESS=str(progress))
    if policy == "auto":   # the defaults, scaled: 60 s, 2 h, one failure per 2 h
        env.update(AUTO_EVERY="auto", AUTO_MIN=str(DEFAULT_MIN_INTERVAL / SCALE),
                   AUTO_MAX=str(DEFAULT_MAX_INTERVAL / SCALE),
                   AUTO_MTBF=str(2 / SCALE))
    elif policy == "baseline":
        env.update(AUTO_EVERY="1e9")
    else:
        env.update(AUTO_EVERY=str(float(policy.split()[0]) * 60 / SCALE))
    return env


def emulate(policy: str, trace_file: Path | None, wd: Path) -> dict[str, Any]:
    """One run of ``spotckpt spot``; its report and what its progress log says."""
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    progress = wd / "progress.log"
    cap = CAP * JOB_HOURS * 3600 / SCALE
    argv = [PY, "-m", "spotckpt", "spot", "--json", "--workdir", str(wd / "job"), "--grace", str(GRACE),
            "--capacity-wait", "0", "--max-run", str(cap), "--max-wait", str(4 * cap)]
    if trace_file is not None:
        argv += ["--interrupt-trace", str(trace_file), "--time-scale", str(SCALE)]
    argv += ["--", PY, str(REPO / "tests" / "scripts" / "auto_train.py")]
    p = subprocess.run(argv, env=_env(policy, progress), capture_output=True, text=True, timeout=3600)
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        rep = {}
    censored = rep.get("SecondaryStatus") == "MaxRuntimeExceeded"
    if p.returncode != 0 and not censored:
        raise RuntimeError(f"{policy}: spotckpt spot exited {p.returncode}:\n{p.stderr[-3000:]}")
    return {"report": _slim(rep), "censored": censored, **_progress(rep, progress), **_phases(rep, wd)}


def _phases(rep: dict[str, Any], wd: Path) -> dict[str, Any]:
    """Each restart's seconds before the command starts (pull, supervisor: not on the trace's
    clock) and after it (imports, restore: on it), and a save's seconds until its local
    commit (snapshot + write: the next save waits for that, not for the upload), from the
    status transitions, the progress log and the last instance's events."""
    steps = [float(x.split()[2]) for x in (wd / "progress.log").read_text().splitlines() if x.startswith("step")] \
        if (wd / "progress.log").exists() else []
    trains = [_wall(t["StartTime"]) for t in rep.get("SecondaryStatusTransitions", []) if t["Status"] == "Training"]
    pre, child = [], []
    starts = _starts(rep)
    for i, (s0, t0) in list(enumerate(zip(starts, trains)))[1:]:
        end = starts[i + 1] if i + 1 < len(starts) else float("inf")
        mine = [x for x in steps if t0 <= x < end]
        if mine:
            pre.append(t0 - s0)
            child.append(max(0.0, min(mine) - t0 - STEP_S))
    writes = []
    for ev in (wd / "job").glob(".*.spotckpt/events.jsonl"):
        for line in ev.read_text().splitlines():
            e = json.loads(line)
            if e.get("event") == "saved":
                writes.append(float(e.get("snapshot_s") or 0) + float(e.get("write_s") or 0))
    return {"restart_pre_s": pre, "restart_child_s": child, "write_s": writes}


def _slim(rep: dict[str, Any]) -> dict[str, Any]:
    keep = ("TrainingTimeInSeconds", "SecondsInTraining", "InterruptionCount", "WorkLostSeconds", "RecordedHistory")
    out = {k: rep.get(k) for k in keep}
    out["InstanceSeconds"] = sum(a.get("InstanceSeconds") or 0.0 for a in rep["Attempts"])
    out["Attempts"] = [{k: a.get(k) for k in ("Number", "StartTime", "InstanceSeconds", "Schedule",
                                               "RecordedEnding", "ExitStatus", "NoticeToExitSeconds")}
                       for a in rep["Attempts"]]
    for a in out["Attempts"]:  # (the decision's numbers; its sentences stay in the run's own report)
        if isinstance(a.get("Schedule"), dict):
            a["Schedule"] = {k: v for k, v in a["Schedule"].items() if k != "sources"}
    return out


def _wall(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()


def _starts(rep: dict[str, Any]) -> list[float]:
    """When each instance started, as its instance seconds count it: the "Downloading" status
    set right after the container started (the attempt's StartTime is before the previous
    instance's dir is removed, which under load took seconds and is no instance's time)."""
    return [_wall(t["StartTime"]) for t in rep.get("SecondaryStatusTransitions", []) if t["Status"] == "Downloading"]


def _progress(rep: dict[str, Any], path: Path) -> dict[str, Any]:
    """Steps run (more than the job's: rework) and each later start's seconds to its first step."""
    lines = [x.split() for x in path.read_text().splitlines()] if path.exists() else []
    steps = [float(x[2]) for x in lines if x[0] == "step"]
    starts = _starts(rep)
    restart = 0.0
    for i, t0 in list(enumerate(starts))[1:]:
        end = starts[i + 1] if i + 1 < len(starts) else float("inf")
        mine = [t for t in steps if t0 <= t < end]
        if mine:
            restart += min(mine) - t0 - STEP_S
        elif i < len(rep["Attempts"]):   # killed before its first step: the whole instance was start-up
            restart += rep["Attempts"][i].get("InstanceSeconds") or 0.0
    return {"steps_run": len(steps), "restart_s": restart}


def run_trace(out: Path, tr: dict[str, Any]) -> dict[str, Any]:
    """One trace: every policy and a baseline at once (they sleep; started together they see
    the same load)."""
    pts = points(tr, 4 * JOB_HOURS * 3600)
    tf = out / f"{tr['name'].replace('/', '-')}.trace"
    tf.parent.mkdir(parents=True, exist_ok=True)
    tf.write_text("".join(f"{p.at:.3f} {'notice' if p.notice else 'kill'}\n" for p in pts))
    runs: dict[str, Any] = {}

    def one(policy: str) -> None:
        try:
            runs[policy] = emulate(policy, None if policy == "baseline" else tf,
                                   out / tr["name"].replace("/", "-") / policy.replace(" ", ""))
        except Exception as e:  # noqa: BLE001 - reported
            runs[policy] = {"error": str(e)}
    threads = [threading.Thread(target=one, args=(p,)) for p in ["baseline", *POLICIES]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = {p: r["error"] for p, r in runs.items() if "error" in r}
    if errors:
        raise RuntimeError(f"trace {tr['name']}: {errors}")
    return metrics(tr, runs)


def metrics(tr: dict[str, Any], runs: dict[str, Any]) -> dict[str, Any]:
    """A trace's row: each policy's lost time against the baseline, and its parts."""
    n_steps = int(round(JOB_HOURS * 3600 / SCALE / STEP_S))
    base = runs["baseline"]["report"]["InstanceSeconds"]
    row: dict[str, Any] = {"trace": tr["name"], "title": tr["title"], "kind": "emulated",
                           "interruptions": runs["auto"]["report"]["InterruptionCount"],
                           "baseline_s": base, "policies": {}, "baseline": runs["baseline"]}
    for policy in POLICIES:
        r = runs[policy]
        lost = max(0.0, r["report"]["InstanceSeconds"] - base) * SCALE
        rework = max(0, r["steps_run"] - n_steps) * STEP_S * SCALE
        restart = r["restart_s"] * SCALE
        row["policies"][policy] = {"lost_s": lost, "rework_s": rework, "restart_s": restart,
                                   "overhead_s": lost - rework - restart, "censored": r["censored"], "run": r}
    return row


def run_emulated(out: Path, traces: list[dict[str, Any]], log: Any = print, parallel: int = 2) -> dict[str, Any]:
    """The traces, ``parallel`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    results: dict[str, Any] = {}
    t0 = time.monotonic()

    def go(tr: dict[str, Any]) -> None:
        row = results[tr["name"]] = run_trace(out, tr)
        log(f"  {tr['name']}: {time.monotonic() - t0:.0f} s  " + ", ".join(
            f"{p} {row['policies'][p]['lost_s'] / 60:.1f} min" for p in POLICIES))
    with ThreadPoolExecutor(parallel) as ex:
        for f in [ex.submit(go, tr) for tr in traces]:
            f.result()
    return {tr["name"]: results[tr["name"]] for tr in traces}


# -- the verdict -------------------------------------------------------------------------------
def verdict(rows: dict[str, Any]) -> dict[str, Any]:
    """Per trace: the best fixed interval in hindsight and auto's ratio to it; across the
    traces: each policy's mean lost time and mean ratio to the best."""
    per = {}
    for name, row in rows.items():
        lost = {p: row["policies"][p]["lost_s"] for p in POLICIES}
        best = min((p for p in POLICIES if p != "auto"), key=lambda p: lost[p])
        per[name] = {"best": best, "ratio": lost["auto"] / lost[best] if lost[best] > 0 else
                     (1.0 if lost["auto"] == 0 else math.inf), "lost": lost}
    means = {p: statistics.mean(per[n]["lost"][p] for n in per) for p in POLICIES}
    ratios = {p: statistics.mean(per[n]["lost"][p] / max(per[n]["lost"][per[n]["best"]], 1e-9) for n in per)
              for p in POLICIES}
    ok_each = all(v["ratio"] <= 1.1 for v in per.values())
    ok_mean = all(means["auto"] < means[p] for p in POLICIES if p != "auto")
    return {"per_trace": per, "mean_lost_s": means, "mean_ratio_to_best": ratios, "each_within_1.1": ok_each,
            "mean_below_every_fixed": ok_mean}


def run(out: Path, quick: bool = False, log: Any = print) -> dict[str, Any]:
    t0 = time.monotonic()
    traces = EMULATED[:2] if quick else EMULATED
    log(f"schedule: {len(traces)} emulated traces x {len(POLICIES)} policies + baseline (one second = "
        f"{SCALE / 60:g} minutes of training)")
    emulated = run_emulated(out, traces, log)
    res = analyze(emulated, quick, log)
    res.update(elapsed_s=time.monotonic() - t0, load=os.getloadavg())
    return res


def analyze(emulated: dict[str, Any], quick: bool = False, log: Any = print) -> dict[str, Any]:
    """Everything derived from the emulated rows: the costs, the replays, the verdict."""
    from schedule_replay import measured_costs, replay_check, run_replayed, seed_sweep

    costs = measured_costs(emulated)
    log(f"  measured (training seconds): C {costs.c:.2f}, time to durable {costs.d:.1f}, restart {costs.restart:.0f}")
    replayed = run_replayed(REPLAYED, costs)
    rows = {**emulated, **replayed}
    log("  the replay over 12 seeds per trace family (the spread of the criterion)")
    return {"scale": SCALE, "job_hours": JOB_HOURS, "step_s": STEP_S, "state_mb": STATE_MB, "grace_s": GRACE,
            "month_days": MONTH_DAYS, "costs": dataclasses.asdict(costs), "rows": rows,
            "check": replay_check(emulated, costs), "verdict": verdict(rows),
            "sweep": seed_sweep(costs, 4 if quick else 12)}


def reanalyze(results: Path, out: Path) -> None:
    """Derive the results again from a run's artifacts in ``out`` (reports, progress logs,
    events): after a change to this analysis, without running the emulator again. The
    measured lost times do not change; run ``bench/run.py --parts schedule --from-json
    RESULTS`` then to render the section."""
    doc = json.loads(results.read_text())
    r = doc["schedule"]
    emulated = {}
    for tr in EMULATED:
        row = r["rows"].get(tr["name"])
        if row is None or row["kind"] != "emulated":
            continue
        runs = {p: x["run"] for p, x in row["policies"].items()}
        runs["baseline"] = row.get("baseline") or {"report": {"InstanceSeconds": row["baseline_s"]}}
        for p, run_ in runs.items():
            wd = out / tr["name"].replace("/", "-") / p.replace(" ", "")
            full = json.loads((wd / "job" / "describe-training-job.json").read_text())
            run_.update(_progress(full, wd / "progress.log"), **_phases(full, wd))
        emulated[tr["name"]] = metrics(tr, runs)
    r.update(analyze(emulated), reanalyzed=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    results.write_text(json.dumps(doc, indent=1, default=str) + "\n")


if __name__ == "__main__":
    if "--reanalyze" in sys.argv:
        reanalyze(REPO / "bench" / "results-schedule.json", REPO / "bench" / "out" / "schedule")
        sys.exit(0)
    r = run(REPO / "bench" / "out" / "schedule", quick="--quick" in sys.argv)
    (REPO / "bench" / "out").mkdir(exist_ok=True)
    (REPO / "bench" / "out" / "results-schedule.json").write_text(json.dumps(r, indent=1, default=str))
    print(json.dumps(r["verdict"], indent=1, default=str))
