"""The peers in ``make bench``: each contender (``bench/peers.py``) measured in the same run,
on the same state and server, contenders interleaved (round r runs them all, in an order
rotated by r, so machine noise hits all alike), medians over the rounds; then the report's
peer tables, the targets as ratios to the best peer, and the scale curve (an SVG written
here: no plotting library needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from peers import CONTENDERS, LABELS
from report_text import grace_table, human, med, ms, sec

TARGETS = ("stall", "durable", "restore", "slowdown")
METRIC = {"stall": "training-thread stall per save", "durable": "save → durable on the remote",
          "restore": "empty dir → state loaded", "slowdown": "CPU-bound loop slowdown"}


def run_peers(b: Any, size: int, rounds: int, reps: int, loop: dict[str, float] | None = None,
              names: list[str] | None = None, loop_rounds: int | None = None,
              loop_only: bool = False) -> dict[str, Any]:
    names = names or CONTENDERS
    out: dict[str, Any] = {"bytes": size, "rounds": rounds, "loop": loop, "runs": {n: [] for n in names},
                           "failed": {}}
    bucket = b.bucket()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                if name in out["failed"]:
                    continue
                prefix = f"{name}/r{r}"
                p = {"name": name, "bytes": size, "reps": reps, "bucket": bucket, "prefix": prefix}
                if loop and r < (rounds if loop_rounds is None else loop_rounds):
                    p.update(loop_seconds=loop["seconds"], interval=loop["interval"], loop_steps=loop.get("steps"),
                             loop_pairs=loop.get("pairs", 1))
                try:
                    got = b.case("save", script="peer_cases.py", **p)
                    if not loop_only:
                        rest = b.case("restore", script="peer_cases.py", name=name, bytes=size, bucket=bucket,
                                      prefix=prefix)
                        got["restore"], got["restore_cpu"] = rest["seconds"], rest.get("cpu")
                except RuntimeError as e:  # a peer that cannot work with this server: its error, reported
                    if name == "spotckpt":
                        raise
                    last = [x for x in str(e).splitlines() if x.strip()][-1:]
                    out["failed"][name] = last[0] if last else str(e)[:300]
                    print(f"  {name} FAILED on this server: {out['failed'][name]}", flush=True)
                    b.empty(bucket, prefix)
                    continue
                out["runs"][name].append(got)
                b.empty(bucket, prefix)
    finally:
        b.drop(bucket)
    return out


def summary(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """contender -> metric -> median over the rounds (stall/durable: of every steady-state save)."""
    s: dict[str, dict[str, float]] = {}
    for name, runs in res["runs"].items():
        if not runs:
            continue
        m = {}
        if all(r.get("stalls") for r in runs):
            m["stall"] = med([x for r in runs for x in r["stalls"]])
            m["durable"] = med([x for r in runs for x in r["durables"]])
        if all("restore" in r for r in runs):
            m["restore"] = med([r["restore"] for r in runs])
        if all(r.get("restore_cpu") is not None and r.get("cpus") for r in runs):  # CPU-seconds, all threads
            m["restore_cpu"] = med([r["restore_cpu"] for r in runs])
            m["durable_cpu"] = med([x for r in runs for x in r["cpus"]])
        if any("slowdown" in r for r in runs):
            m["slowdown"] = med([r["slowdown"] for r in runs if "slowdown" in r])
            m["saves"] = med([r["loop_saves"] for r in runs if "slowdown" in r])
        s[name] = m
    return s


def fmt(metric: str, v: float) -> str:
    return f"{100 * v:+.1f}%" if metric == "slowdown" else (ms(v) if metric == "stall" else sec(v))


def table(res: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The peers × metrics table (best of each column in bold, spotckpt's ratio to the best
    peer) and one verdict per target."""
    s = summary(res)
    peers = [n for n in s if n != "spotckpt"]
    metrics = [m for m in TARGETS if all(m in s[n] for n in s)]
    best = {m: min(peers, key=lambda n: s[n][m]) for m in metrics}
    top = {m: min(s, key=lambda n: s[n][m]) for m in metrics}
    head = "| contender | " + " | ".join(METRIC[m] for m in metrics) + " |"
    lines = [head, "|---" * (len(metrics) + 1) + "|"]
    for n in s:
        cells = []
        for m in metrics:
            v = fmt(m, s[n][m])
            if n == top[m]:
                v = f"**{v}**"
            if f"{m}_cpu" in s[n]:  # CPU-seconds beside the wall time (every thread of the process)
                v += f", {s[n][m + '_cpu']:.2f} CPU-s"
            if m == "slowdown" and "saves" in s[n]:
                v += f" ({s[n]['saves']:.0f} saves)"
            if n == "spotckpt" and m != "slowdown":
                v += f" ({s[n][m] / s[best[m]][m]:.2f}× best peer)"
            cells.append(v)
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    verdicts = []
    for m in metrics:
        sp, bp = s["spotckpt"][m], s[best[m]][m]
        ok = sp <= bp if m != "slowdown" else sp <= bp + 1e-9
        verdicts.append({"metric": m, "spot": sp, "best": bp, "best_name": best[m],
                         "ratio": (sp / bp) if m != "slowdown" and bp else None, "ok": ok, "bytes": res["bytes"]})
    return lines, verdicts


def verdict_rows(verdicts: list[dict[str, Any]], why: dict[str, str]) -> list[str]:
    lines = ["| target | size | spotckpt | best peer (same run) | ratio | verdict | measured reason |",
             "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        m = v["metric"]
        target = f"{METRIC[m]} ≤ 1.0× best peer" if m != "slowdown" else f"{METRIC[m]} ≤ best peer's"
        ratio = f"{v['ratio']:.2f}×" if v["ratio"] is not None else f"{100 * (v['spot'] - v['best']):+.1f} pts"
        reason = why.get(f"{m}@{v['bytes']}", why.get(m, ""))
        lines.append(f"| {target} | {human(v['bytes'])} | {fmt(m, v['spot'])} | {fmt(m, v['best'])} "
                     f"({LABELS[v['best_name']].split(': ')[0]}) | {ratio} | {'met' if v['ok'] else '**missed**'} | "
                     f"{reason} |")
    return lines


# -- the scale curve ----------------------------------------------------------------------
def run_scale(b: Any, sizes: list[int], names: list[str], reps: int = 1) -> dict[str, Any]:
    """save -> durable and restore per size, for ``names``, interleaved per size."""
    out: dict[str, Any] = {"sizes": sizes, "names": names, "points": {n: [] for n in names}}
    for size in sizes:
        res = run_peers(b, size, rounds=1, reps=reps, names=names)
        s = summary(res)
        for n in names:
            out["points"][n].append({"bytes": size, "durable": s[n]["durable"], "restore": s[n]["restore"],
                                     "stall": s[n]["stall"]})
    return out


_COLORS = {"spotckpt": "#d62728", "sagemaker": "#1f77b4", "dcp_local": "#2ca02c", "lightning_local": "#9467bd",
           "dcp_s3": "#8c564b", "lightning_s3": "#e377c2", "s3fs_save": "#7f7f7f", "s3torch": "#ff7f0e",
           "s3torch_dcp": "#17becf"}


def svg(scale: dict[str, Any], path: Path, title: str) -> None:
    """Two panels (save → durable, restore): seconds against state size, log2 x axis."""
    import math

    sizes = scale["sizes"]
    W, H, pad, gap = 900, 380, 60, 40
    pw = (W - 2 * pad - gap) / 2
    ph = H - 2 * pad
    xs = [math.log2(s) for s in sizes]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for i, metric in enumerate(("durable", "restore")):
        left = pad + i * (pw + gap)
        top = max([p[metric] for n in scale["names"] for p in scale["points"][n]] + [1e-3]) * 1.1

        def X(v: float) -> float:
            return left + (math.log2(v) - x0) / (x1 - x0) * pw

        def Y(v: float) -> float:
            return pad + ph - v / top * ph
        parts.append(f'<rect x="{left}" y="{pad}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        parts.append(f'<text x="{left + pw / 2}" y="{pad - 8}" text-anchor="middle">'
                     f'{"save → durable (s)" if metric == "durable" else "empty dir → loaded (s)"}</text>')
        for s in sizes:
            parts.append(f'<text x="{X(s)}" y="{pad + ph + 16}" text-anchor="middle">{human(s)}</text>')
        for k in range(5):
            v = top * k / 4
            parts.append(f'<text x="{left - 4}" y="{Y(v) + 4}" text-anchor="end">{v:.1f}</text>')
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(v)}" y2="{Y(v)}" stroke="#eee"/>')
        for n in scale["names"]:
            pts = " ".join(f"{X(p['bytes']):.1f},{Y(p[metric]):.1f}" for p in scale["points"][n])
            c = _COLORS.get(n, "#000")
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
            parts += [f'<circle cx="{X(p["bytes"]):.1f}" cy="{Y(p[metric]):.1f}" r="3" fill="{c}"/>'
                      for p in scale["points"][n]]
    for j, n in enumerate(scale["names"]):
        y = H - 14 - 16 * (len(scale["names"]) - 1 - j)
        parts.append(f'<rect x="{pad}" y="{y - 9}" width="12" height="3" fill="{_COLORS.get(n, "#000")}"/>'
                     f'<text x="{pad + 18}" y="{y - 4}">{LABELS[n].replace("`", "")}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def scale_table(scale: dict[str, Any]) -> list[str]:
    names = scale["names"]
    lines = ["| state | " + " | ".join(f"{LABELS[n].split(': ')[0]}: durable / restore" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i, size in enumerate(scale["sizes"]):
        lines.append(f"| {human(size)} | " + " | ".join(
            f"{sec(scale['points'][n][i]['durable'])} / {sec(scale['points'][n][i]['restore'])}" for n in names) + " |")
    return lines


def durable_within(scale: dict[str, Any], name: str = "spotckpt") -> tuple[list[str], str]:
    """Largest state durable in 10/30/120 s of grace: a least-squares line through spotckpt's
    save → durable points of the scale curve (``report_text.grace_table``)."""
    return grace_table([(p["bytes"], p["durable"]) for p in scale["points"][name]])
