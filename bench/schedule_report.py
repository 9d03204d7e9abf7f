"""The ``schedule`` part's section of BENCHMARKS.md and its plot (bench/schedule.svg)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

HEADING = "## Choosing the interval: every=\"auto\" against fixed intervals"
POLICIES = ["auto", "1 min", "5 min", "15 min", "60 min"]
_COLORS = {"auto": "#d62728", "1 min": "#1f77b4", "5 min": "#2ca02c", "15 min": "#9467bd", "60 min": "#8c564b"}


def _min(s: float) -> str:
    return f"{s / 60:.1f}" if s < 6000 else f"{s / 60:.0f}"


def _cell(p: dict[str, Any]) -> str:
    return ("≥ " if p.get("censored") else "") + _min(p["lost_s"])


def section(r: dict[str, Any], svg_path: Path, svg_ref: str, raw: str | None = None) -> list[str]:
    """The section's Markdown lines; writes the plot to ``svg_path``."""
    v, rows, c = r["verdict"], r["rows"], r["costs"]
    plot(r, svg_path)
    scale_min = r["scale"] / 60
    lines = [
        "", HEADING, "",
        f"Written by `python bench/run.py --parts schedule` (part of `make bench`) in {r['elapsed_s'] / 60:.1f} min, "
        f"load average {r['load'][0]:.1f} at the end"
        + (f" (the analysis derived again from that run's artifacts on {r['reanalyzed']}: `python bench/schedule.py "
           "--reanalyze`)" if r.get("reanalyzed") else "") + ". Lost time = checkpoint overhead + rework + restarts, in **minutes "
        "of training**; the best fixed interval is chosen in hindsight per trace. every=\"auto\" runs with its defaults "
        "(60 s to 2 h, a prior of one failure without warning per 2 h, weighted as a quarter of a failure; failures counted "
        "since the rate may have changed, weighed by the posterior over the restart where it began: a 2% chance of a change at "
        "each restart after a failure), scaled like the traces.",
        "",
        f"- **Emulated** rows: `spotckpt spot` replays the trace against a real job ({r['state_mb']} MiB numpy state, "
        f"steps that sleep) with real saves, kills and restarts, each policy and an uninterrupted baseline started "
        f"together. One emulated second stands for {scale_min:g} minutes of training: a {r['job_hours']:g} h job runs "
        f"in {r['job_hours'] * 3600 / r['scale']:.0f} s, a 1-minute interval is {60 / r['scale']:g} s. Not scaled: "
        f"what the machine does (a save's stall and write, a restart's process start and pull, so a restart costs "
        f"~{c['restart'] / 60:.0f} minutes of training), and the grace ({r['grace_s']:g} s = "
        f"{r['grace_s'] * scale_min:g} min). A run stopped after 2.5x the job's time shows its loss as a lower bound "
        "(≥).",
        f"- **Replayed** rows: the AWS Spot Instance Advisor bands over a {r['month_days']}-day job (at one second per "
        f"{scale_min:g} minutes a month would take {r['month_days'] * 1440 / scale_min / 3600:.0f} h): the same policy "
        "code (`_autosave._Auto.decide`, `AutoInterval`, `EverySeconds`) on a virtual clock, with the costs the "
        f"emulated runs measured: C {c['c']:.1f} s, time to durable {c['d']:.0f} s, restart {c['restart'] / 60:.1f} min, "
        f"notice save {c['notice']:.0f} s (training seconds).",
        "",
        f"![lost time relative to the best fixed interval]({svg_ref})",
        "",
        "| trace | runs | interruptions | auto | 1 min | 5 min | 15 min | 60 min | best fixed | auto / best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        per = v["per_trace"][name]
        ps = row["policies"]
        lines.append(f"| {row['title']} | {row['kind']} | {row['interruptions']} | "
                     + " | ".join(_cell(ps[p]) for p in POLICIES)
                     + f" | {per['best']} | **{per['ratio']:.2f}** |")
    lines.append("| **mean lost** | | | " + " | ".join(f"**{_min(v['mean_lost_s'][p])}**" for p in POLICIES) + " | | |")
    lines.append("| **mean ratio to the best fixed** | | | "
                 + " | ".join(f"{v['mean_ratio_to_best'][p]:.2f}" for p in POLICIES) + " | | |")
    worst = max(v["per_trace"].items(), key=lambda kv: kv[1]["ratio"])
    lines += [
        "",
        f"- every trace within 1.1x of the best fixed interval: **{'yes' if v['each_within_1.1'] else 'NO'}** "
        f"(worst: {worst[1]['ratio']:.2f} on \"{rows[worst[0]]['title']}\")",
        f"- mean lost time below every fixed interval's: **{'yes' if v['mean_below_every_fixed'] else 'NO'}**",
        "",
        "Where auto's time went, next to the best fixed interval (minutes of training):",
        "",
        "| trace | policy | overhead | rework | restarts | lost |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        best = v["per_trace"][name]["best"]
        for p in ("auto", best):
            x = row["policies"][p]
            lines.append(f"| {row['title'] if p == 'auto' else ''} | {p} | {_min(x['overhead_s'])} | "
                         f"{_min(x['rework_s'])} | {_min(x['restart_s'])} | {_cell(x)} |")
    sweep = r.get("sweep") or []
    if sweep:
        lines += ["", f"How much of a per-trace verdict is the luck of the draw: the replay over {sweep[0]['seeds']} "
                  "other seeds of each trace family (auto against the best fixed interval in hindsight of each "
                  "draw):", "", "| trace family | median | worst | within 1.1x |", "|---|---|---|---|"]
        lines += [f"| {x['trace']} | {x['median']:.3f} | {x['worst']:.2f} | {x['within_1.1']}/{x['seeds']} |"
                  for x in sweep]
    chk = r.get("check") or {}
    if chk:
        lines += ["", "The replay checked against the emulator on the emulated traces (lost minutes, emulated / "
                  "replayed):", "", "| trace | " + " | ".join(POLICIES) + " |", "|---" * (len(POLICIES) + 1) + "|"]
        for name, per in chk.items():
            lines.append(f"| {rows[name]['title']} | " + " | ".join(
                f"{_min(per[p]['emulated'])} / {_min(per[p]['replayed'])}" for p in POLICIES) + " |")
    if raw:
        lines += ["", f"Every figure, in full: [`{raw}`]({raw})."]
    return lines + [""]


def plot(r: dict[str, Any], path: Path) -> None:
    """Grouped bars: each policy's lost time over the best fixed interval's, per trace."""
    rows, v = r["rows"], r["verdict"]
    names = list(rows)
    W, H, pad, top_pad = 960, 420, 60, 50
    pw, ph = W - 2 * pad, H - top_pad - 120
    cap = 4.0
    gw = pw / max(1, len(names))
    bw = gw / (len(POLICIES) + 1)

    def Y(x: float) -> float:
        return top_pad + ph - min(x, cap) / cap * ph
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="11"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">lost time / best fixed interval\'s, '
             f'per trace (capped at {cap:g}x; red: every="auto")</text>']
    for k in range(int(cap) + 1):
        parts.append(f'<line x1="{pad}" x2="{pad + pw}" y1="{Y(k)}" y2="{Y(k)}" stroke="#eee"/>'
                     f'<text x="{pad - 4}" y="{Y(k) + 4}" text-anchor="end">{k}x</text>')
    parts.append(f'<line x1="{pad}" x2="{pad + pw}" y1="{Y(1.1)}" y2="{Y(1.1)}" stroke="#d62728" '
                 'stroke-dasharray="4,3"/>')
    parts.append(f'<text x="{pad + pw}" y="{Y(1.1) - 3}" text-anchor="end" fill="#d62728">1.1x</text>')
    for i, n in enumerate(names):
        best = max(v["per_trace"][n]["lost"][v["per_trace"][n]["best"]], 1e-9)
        for j, p in enumerate(POLICIES):
            ratio = v["per_trace"][n]["lost"][p] / best
            x = pad + i * gw + (j + 0.5) * bw
            parts.append(f'<rect x="{x:.1f}" y="{Y(ratio):.1f}" width="{bw * 0.9:.1f}" '
                         f'height="{Y(0) - Y(ratio):.1f}" fill="{_COLORS[p]}"/>')
            if ratio > cap:
                parts.append(f'<text x="{x + bw * 0.45:.1f}" y="{Y(cap) - 2:.1f}" text-anchor="middle" '
                             f'font-size="9">{ratio:.0f}x</text>')
        label = re.sub(r"[<>&]", lambda m: {"<": "&lt;", ">": "&gt;", "&": "&amp;"}[m.group()], n)
        parts.append(f'<text transform="translate({pad + (i + 0.5) * gw:.1f},{top_pad + ph + 14}) rotate(20)" '
                     f'text-anchor="start">{label}</text>')
    for j, p in enumerate(POLICIES):
        x = pad + j * 110
        parts.append(f'<rect x="{x}" y="{H - 22}" width="12" height="10" fill="{_COLORS[p]}"/>'
                     f'<text x="{x + 16}" y="{H - 13}">{p}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def splice(md: str, lines: list[str]) -> str:
    """``md`` (BENCHMARKS.md) with this section replaced, or added before "## Raw results"."""
    text = "\n".join(lines).strip("\n") + "\n"
    pat = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(md):
        return pat.sub(lambda m: text + "\n", md, count=1)
    at = md.find("\n## Raw results")
    if at < 0:
        return md.rstrip("\n") + "\n\n" + text
    return md[:at] + "\n\n" + text + md[at:]


def report_lines(r: dict[str, Any], out: Path, raw: str | None = None) -> list[str]:
    """The section for the report at ``out``; the plot beside it (bench/schedule.svg for
    BENCHMARKS.md)."""
    default = out.resolve() == (REPO / "BENCHMARKS.md").resolve()
    svg = REPO / "bench" / "schedule.svg" if default else out.with_name(out.stem + "-schedule.svg")
    return section(r, svg, os.path.relpath(svg, out.resolve().parent), raw)


def write_alone(run: dict[str, Any], out: Path, from_json: list[str] | None) -> Path:
    """The schedule part run alone: its raw results (bench/results-schedule.json for
    BENCHMARKS.md) and its section spliced into the report at ``out``. Returns the raw file."""
    raw = REPO / "bench" / "results-schedule.json" if out.resolve() == (REPO / "BENCHMARKS.md").resolve() \
        else out.with_name(out.stem + "-schedule.json")
    if not (from_json and [str(Path(f).resolve()) for f in from_json] == [str(raw.resolve())]):
        raw.write_text(json.dumps(run, indent=1, default=str) + "\n")
    rel = os.path.relpath(raw, out.resolve().parent)
    out.write_text(splice(out.read_text(), report_lines(run["schedule"], out, rel)))
    return raw


__all__ = ["HEADING", "plot", "report_lines", "section", "splice", "write_alone"]
