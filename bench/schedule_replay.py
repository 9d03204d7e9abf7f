"""The replay of bench/schedule.py: a policy on a trace in virtual time, with the policy code
itself and the costs the emulated runs measured; checked against the emulator; and a sweep
over seeds that shows how often the per-trace criterion holds by luck of the draw."""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from schedule import EMULATED, GRACE, JOB_HOURS, MONTH_DAYS, POLICIES, REPLAYED, SCALE, STEP_S, points

from spotckpt._spot import _traces


@dataclasses.dataclass
class Costs:
    """What the emulated runs measured, in seconds of training."""

    c: float              # a periodic save's cost
    d: float              # its time to durable
    restart: float        # a restart until the first step
    notice: float         # a notice save until the process is gone
    restart_child: float = 0.0   # of ``restart``, the part on the trace's clock (the command's start-up)
    write: float = 0.0    # a save until its local commit (the next save waits for that)


def measured_costs(emulated: dict[str, Any]) -> Costs:
    cs, ds, rs, ns = [], [], [], []
    for row in emulated.values():
        a = row["policies"]["auto"]["run"]["report"]
        for att in a["Attempts"]:
            s = att.get("Schedule") or {}
            if s.get("c_s") is not None:
                cs.append(s["c_s"] * SCALE)
            if s.get("d_s") is not None:
                ds.append(s["d_s"] * SCALE)
        k = len(a["Attempts"]) - 1
        if k:
            rs.append(row["policies"]["auto"]["restart_s"] / k)
    for row in emulated.values():
        for p in row["policies"].values():
            for att in p["run"]["report"]["Attempts"]:
                if att.get("RecordedEnding") == "notice-saved" and att.get("NoticeToExitSeconds") is not None:
                    ns.append(att["NoticeToExitSeconds"] * SCALE)
    pre = [x * SCALE for row in emulated.values() for x in row["policies"]["auto"]["run"].get("restart_pre_s", [])]
    child = [x * SCALE for row in emulated.values() for x in row["policies"]["auto"]["run"].get("restart_child_s", [])]
    ws = [x * SCALE for row in emulated.values() for x in row["policies"]["auto"]["run"].get("write_s", [])]
    med = (lambda xs, default: statistics.median(xs) if xs else default)
    restart = med(rs, 120.0)
    share = med(child, 0.0) / (med(child, 0.0) + med(pre, 0.0)) if child and pre else 0.5
    return Costs(c=med(cs, 1.0), d=med(ds, 10.0), restart=restart, notice=med(ns, 30.0),
                 restart_child=restart * share, write=med(ws, med(ds, 10.0) / 2))


def replay(pts: list[_traces.Point], policy: str, costs: Costs, job_s: float, step_s: float = 60.0,
           grace: float = 120.0, timeline: list[tuple[float, str, str]] | None = None) -> dict[str, float]:
    """One policy on one trace, in virtual time (seconds of training), with the policy code
    itself: ``_Auto.decide`` for every="auto" (the history's counts fed as a supervisor would
    leave them), ``every_seconds`` for the fixed ones. ``timeline``, if given, gets
    ``(trace clock, what, detail)`` for each start, interruption and change of interval."""
    def note(what: str, detail: str) -> None:
        if timeline is not None:
            timeline.append((t, what, detail))
    from spotckpt._cadence import Schedule
    from spotckpt._checkpointer._autosave import _Auto
    from spotckpt._checkpointer._policies import AutoInterval, EverySeconds
    from spotckpt._remote import _history

    t = 0.0                                      # the trace's clock
    done = durable = 0.0                         # useful seconds of training: run, and durable
    ended: dict[str, int] = {}
    runs: list[list[Any]] = []                   # the history's [run_s, ended] per incarnation
    run_s = 0.0
    incarnations = saves = 0
    rework = restart = overhead = rework_mean = 0.0
    queue = list(pts)
    prev_decision: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    while done < job_s:
        clock = [t]
        if incarnations:   # the supervisor's start and pull are off the trace's clock, the command's are on it
            restart += costs.restart
        t += costs.restart_child if incarnations else 0.0
        clock[0] = t
        t_start = t
        summ = {"incarnations": incarnations, "run_s": run_s, "ended": dict(ended), "runs": runs[-32:],
                "startup_s": costs.restart,
                "previous": {"generation": incarnations, "decision": prev_decision} if prev_decision else None,
                "measured": ({"generation": incarnations, "decision": prev_decision}
                             if prev_decision and prev_decision.get("c_s") is not None else measured)}
        measured = summ["measured"]
        if policy == "auto":
            a = _Auto(Schedule(), clock=lambda: clock[0], grace=grace, grace_source="replay", state_dir=Path("/"),
                      shared_state=Path("/"))
            a.local_copy = {"summary": summ, "generation": incarnations + 1}
            a.seed()
            pol: Any = AutoInterval(a.decide, clock=lambda: clock[0])
        else:
            pol = EverySeconds(float(policy.split()[0]) * 60.0, clock=lambda: clock[0])
        note("start", f"incarnation {incarnations + 1}, {done / 3600:.2f} h of the job done")
        shown = None
        pending: list[tuple[float, float, int]] = []   # (durable at, work it makes durable, save number)
        last_start = -1e18
        last_beat = t
        failure = queue[0] if queue else None
        while True:
            while pending and pending[0][0] <= t:
                at, work, k = pending.pop(0)
                durable = max(durable, work)
                last_beat = at
                if policy == "auto":
                    a.meter.durable(at=at, step=k)
            if failure is not None and failure.at <= t:
                queue.pop(0)
                fits = costs.d * 1.25 + 0.5 < grace - 1.5
                if failure.notice and fits:
                    t += costs.notice
                    overhead += costs.notice
                    durable = done
                    how = "notice-saved"
                    runs.append([t - t_start, how])
                    run_s += t - t_start
                else:
                    rework += done - durable
                    # what the kill costs on average at the interval in force (the phase of the kill
                    # in the interval is luck): half an interval and the time to durable
                    tau = pol.interval if policy == "auto" else pol.seconds
                    rework_mean += min(tau, t - t_start) / 2.0 + min(costs.d, t - t_start)
                    done = durable
                    how = "hard-kill" if not failure.notice else "notice-late"
                    runs.append([last_beat - t_start, how])
                    run_s += last_beat - t_start
                ended[how] = ended.get(how, 0) + 1
                note(how, f"lost {(rework if how != 'notice-saved' else 0) / 60:.0f} min of work so far")
                if policy == "auto":
                    prev_decision = pol.decision.to_dict()
                incarnations += 1
                break
            if done >= job_s:
                break
            step = min(step_s, job_s - done)
            t += step
            done += step
            clock[0] = t
            if policy == "auto":   # the Checkpointer's own meter: step times, then the save's stall
                n = a.meter.samples
                a.meter.step(step)
                if a.meter.samples != n:
                    pol.refresh()
            if timeline is not None and policy == "auto":
                dec = pol.decision
                if shown is None or abs(dec.interval - shown) > 0.05 * shown:
                    shown = dec.interval
                    note("interval", f"{dec.interval / 60:.1f} min ({dec.how}), rate 1 per "
                         f"{1 / max(dec.rate, 1e-12) / 3600:.3g} h; " + dec.sources.get("rate", "").split(",")[0])
            if pol.due(0):
                # the writer holds one save at a time: a save waits for the previous one's local commit
                wait = max(0.0, last_start + costs.write - t)
                t0 = last_start = t
                t += costs.c + wait
                overhead += costs.c + wait
                clock[0] = t
                saves += 1
                pending.append((t + costs.d, done, saves))
                if policy == "auto":
                    a.meter.saved(costs.c + wait, at=t0, step=saves)
                pol.saved(0)
        if done >= job_s:
            break
    lost = rework + restart + overhead
    return {"lost_s": lost, "rework_s": rework, "restart_s": restart, "overhead_s": overhead, "saves": saves,
            "rework_mean_s": rework_mean, "lost_mean_s": lost - rework + rework_mean,
            "incarnations": incarnations + 1, "_history": _history.FORMAT}


def run_replayed(traces: list[dict[str, Any]], costs: Costs) -> dict[str, Any]:
    job_s = MONTH_DAYS * 86400.0
    out = {}
    for tr in traces:
        pts = points(tr, 2 * job_s)
        row = {"trace": tr["name"], "title": tr["title"], "kind": "replayed",
               "interruptions": len([p for p in pts if p.at < job_s]), "policies": {}}
        for policy in POLICIES:
            row["policies"][policy] = replay(pts, policy, costs, job_s)
        out[tr["name"]] = row
    return out


def replay_check(emulated: dict[str, Any], costs: Costs) -> dict[str, Any]:
    """The replay on the emulated traces, next to what the emulator measured."""
    job_s = JOB_HOURS * 3600
    out = {}
    for tr in EMULATED:
        if tr["name"] not in emulated:
            continue
        pts = points(tr, 4 * job_s)
        out[tr["name"]] = {p: {"emulated": emulated[tr["name"]]["policies"][p]["lost_s"],
                               "replayed": replay(pts, p, costs, job_s, step_s=STEP_S * SCALE,
                                                  grace=GRACE * SCALE)["lost_s"]} for p in POLICIES}
    return out


def families() -> list[tuple[dict[str, Any], float, float, float]]:
    """Every trace with its job's length, step and grace (training seconds)."""
    return ([(tr, JOB_HOURS * 3600.0, STEP_S * SCALE, GRACE * SCALE) for tr in EMULATED]
            + [(tr, MONTH_DAYS * 86400.0, 60.0, 120.0) for tr in REPLAYED])


def seed_sweep(costs: Costs, seeds: int = 12) -> list[dict[str, Any]]:
    """Each emulated trace family (and the advisor months) replayed over ``seeds`` other
    seeds: auto's ratio to the best fixed interval in hindsight, median, worst, and how many
    within 1.1x; and the same ratio of the time lost expected over where each failure falls
    (``expected_median``, ``expected_worst``: the policy without the luck of the phases)."""
    out = []
    for tr, job_s, step_s, grace in families():
        if "points" in tr:
            continue
        ratios, expected = [], []
        for k in range(seeds):
            pts = points(dict(tr, seed=1000 + 97 * k), (4 if job_s < 86400 else 2) * job_s)
            got = {p: replay(pts, p, costs, job_s, step_s=step_s, grace=grace) for p in POLICIES}
            for key, acc in (("lost_s", ratios), ("lost_mean_s", expected)):
                best = min(got[p][key] for p in POLICIES if p != "auto")
                acc.append(got["auto"][key] / best if best > 0 else 1.0)
        out.append({"trace": tr["title"], "seeds": seeds, "median": statistics.median(ratios), "worst": max(ratios),
                    "within_1.1": sum(r <= 1.1 for r in ratios), "expected_median": statistics.median(expected),
                    "expected_worst": max(expected)})
    return out


__all__ = ["Costs", "main", "measured_costs", "replay", "replay_check", "run_replayed", "seed_sweep"]


def main(argv: list[str] | None = None) -> None:
    """``python bench/schedule_replay.py [--seeds N] [--json OUT] [--timeline TRACE [--seed N]]``:
    the replay alone, with the costs a run measured (``bench/results-schedule.json``): the
    replayed month rows, the emulated traces replayed, and the seed sweep, each ratio also as
    expected over where each failure falls (the policy without the luck of the phases). A
    minute or two, where the full part takes ~20 min."""
    import argparse
    import json

    from schedule import REPO

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--costs", default=str(REPO / "bench" / "results-schedule.json"))
    p.add_argument("--json", default=None)
    p.add_argument("--timeline", metavar="TRACE", default=None,
                   help="print auto's intervals over time and where the interruptions fell on the traces whose "
                        "name or title contains TRACE (with --seed: that seed of the family), then stop")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    costs = Costs(**json.loads(Path(a.costs).read_text())["schedule"]["costs"])
    if a.timeline is not None:
        for tr, job_s, step_s, grace in families():
            if a.timeline not in tr["name"] and a.timeline not in tr["title"]:
                continue
            if a.seed is not None:
                tr = dict(tr, seed=a.seed)
            tl: list[tuple[float, str, str]] = []
            pts = points(tr, (4 if job_s < 86400 else 2) * job_s)
            lost = {pol: replay(pts, pol, costs, job_s, step_s=step_s, grace=grace,
                                timeline=tl if pol == "auto" else None) for pol in POLICIES}
            print(f"# {tr['title']} (seed {tr.get('seed')}): lost min " + ", ".join(
                f"{pol} {r['lost_s'] / 60:.0f} (overhead {r['overhead_s'] / 60:.0f}, rework {r['rework_s'] / 60:.0f})"
                for pol, r in lost.items()))
            for at, what, detail in tl:
                print(f"  {at / 3600:8.2f} h  {what:<13} {detail}")
        return
    job_s = JOB_HOURS * 3600
    rows = {tr["title"]: {pol: replay(points(tr, 4 * job_s), pol, costs, job_s, step_s=STEP_S * SCALE,
                                      grace=GRACE * SCALE) for pol in POLICIES} for tr in EMULATED}
    rows.update({r["title"]: r["policies"] for r in run_replayed(REPLAYED, costs).values()})
    print("| trace | " + " | ".join(POLICIES) + " | auto / best | expected |\n|---|"
          + "---|" * (len(POLICIES) + 2))
    for title, pols in rows.items():
        best = min(pols[q]["lost_s"] for q in POLICIES if q != "auto")
        best_mean = min(pols[q]["lost_mean_s"] for q in POLICIES if q != "auto")
        print(f"| {title} | " + " | ".join(f"{pols[q]['lost_s'] / 60:.0f}" for q in POLICIES)
              + f" | {pols['auto']['lost_s'] / best:.3f} | {pols['auto']['lost_mean_s'] / best_mean:.3f} |")
    sweep = seed_sweep(costs, a.seeds)
    print(f"\n| trace family ({a.seeds} seeds) | median | worst | within 1.1x | expected: median | worst |"
          "\n|---|---|---|---|---|---|")
    for s in sweep:
        print(f"| {s['trace']} | {s['median']:.3f} | {s['worst']:.2f} | {s['within_1.1']}/{s['seeds']} | "
              f"{s['expected_median']:.3f} | {s['expected_worst']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "sweep": sweep}, indent=1, default=str))


if __name__ == "__main__":
    main()
