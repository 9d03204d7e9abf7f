"""BENCHMARKS.md's peer sections (used by ``run.py``): the peers × metrics tables, the
targets as ratios to the best peer with met/missed and the measured reason, the scale curve
(table + SVG) and the largest state durable within a grace period."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from peer_bench import durable_within, scale_table, summary, svg, table, verdict_rows
from peers import LABELS
from report_text import human, ms, sec



def _why(res: dict[str, Any], r: dict[str, Any] | None = None) -> dict[str, str]:
    """Why each target was met or missed, from this run's numbers (``r``: the whole run,
    whose row 3 measured the writer with the payload streaming)."""
    s = summary(res)
    sp = s["spotckpt"]
    peers = {n: v for n, v in s.items() if n != "spotckpt"}
    runs = res["runs"]["spotckpt"]
    size = human(res["bytes"])
    out: dict[str, str] = {}
    if "stall" not in sp:  # the loop alone
        return {f"{k}@{res['bytes']}": v for k, v in _why_loop(res, s, sp, peers, runs).items()}
    dcp = peers.get("dcp_local", {})
    out["stall"] = (f"spotckpt's save is one memcpy into buffers reused from save to save; DCP's `async_save` "
                    f"stages into its cached CPU copy the same way ({ms(dcp.get('stall', 0))}); the others copy into "
                    f"fresh memory (Lightning clones every tensor) or serialise in the training thread "
                    f"(SageMaker pattern {ms(peers.get('sagemaker', {}).get('stall', 0))}). spotckpt per save: "
                    + ", ".join(ms(x) for r in runs for x in r["stalls"]) + ".")
    best_d = min(peers, key=lambda n: peers[n]["durable"])
    out["durable"] = (f"spotckpt streams the payload while `torch.save` writes it (multipart, 8 parts in flight), "
                      f"then commits the manifest; the best peer ({LABELS[best_d].split(': ')[0]}) writes the file "
                      f"first, then uploads it with the same client settings. spotckpt per save: "
                      + ", ".join(sec(x) for r in runs for x in r["durables"]) + "; best peer: "
                      + ", ".join(sec(x) for r in res["runs"][best_d] for x in r["durables"]) + "."
                      + _one_core(r or {}))
    best_r = min(peers, key=lambda n: peers[n]["restore"])
    out["restore"] = (f"both download with parallel ranged GETs; spotckpt also sends a write probe (PUT + DELETE: a "
                      f"remote it could not write to must fail before training, not at the first save), lists the "
                      f"checkpoints, reads the manifest, checks the payload's size and XXH3 checksum, and lists the "
                      f"prefix for the script's own files; the best peer ({LABELS[best_r].split(': ')[0]}) lists and "
                      f"downloads. spotckpt per round: " + ", ".join(sec(r["restore"]) for r in runs)
                      + "; best peer: " + ", ".join(sec(r["restore"]) for r in res["runs"][best_r]) + f" ({size}).")
    return {f"{k}@{res['bytes']}": v for k, v in out.items()}


def _one_core(r: dict[str, Any]) -> str:
    """What row 3 of the same run measured of a save whose payload streams while it is written."""
    u, st = r.get("upload"), r.get("stall")
    if not u or not st or not u.get("write"):
        return ""
    return (f" Row 3 of this run shows why streaming gains nothing here: with the payload streaming up, the "
            f"writer (`torch.save`, XXH3, fsync) took {sec(u['write'])} for {human(u['bytes'])}, against "
            f"{sec(st['torch_save'])} for `torch.save` with fsync alone (the reference under row 1): the client has "
            "one core, so the writer and the upload (botocore's Python, CRC32, socket copies) take turns on it and "
            "on the GIL. spotckpt's save → durable is then the write plus the upload plus what spotckpt adds: the "
            f"snapshot memcpy ({ms(st['memcpy'])} for {human(st['bytes'])}), the XXH3 checksum, the local commit's "
            "fsync, the manifest PUT and the generation check; the SageMaker pattern's is the write (in the training "
            "thread) and the upload. On a host with a spare core the write and the upload overlap; that is not "
            "measured here.")


def _why_loop(res: dict[str, Any], s: dict, sp: dict, peers: dict, runs: list) -> dict[str, str]:
    out: dict[str, str] = {}
    if "slowdown" in sp:
        best_l = min(peers, key=lambda n: peers[n]["slowdown"])
        out["slowdown"] = (f"the client has one core and the loop keeps it busy: every CPU-second of the background "
                           f"pipeline is taken from training. spotckpt saved {sp['saves']:.0f} times per loop, the best "
                           f"peer ({LABELS[best_l].split(': ')[0]}) {peers[best_l]['saves']:.0f} times; spotckpt's extra "
                           "work per save is the XXH3 checksum and the fsync of the local commit, the boto3 peers' the "
                           "file write and the upload, as spotckpt's. Per round (spotckpt / best peer): "
                           + ", ".join(f"{100 * a['slowdown']:+.1f}% / {100 * b['slowdown']:+.1f}%"
                                       for a, b in zip(runs, res["runs"][best_l])
                                       if "slowdown" in a and "slowdown" in b) + ".")
    return out


def peer_sections(r: dict[str, Any], svg_path: Path, svg_ref: str) -> list[str]:
    if not r.get("peers"):
        return scale_section(r, svg_path, svg_ref)  # (the scale part run alone)
    server = r.get("server", "moto")
    lines = ["", "## Against the peers", "",
             f"What users pick instead, each measured in this run on the same state (float32 tensors, 16 of them) "
             f"and the same S3 server ({'Ceph RGW' if server == 'rgw' else 'moto'}), contenders interleaved: round "
             f"*r* runs every contender once, in an order rotated by *r*, each case in a process of its own (forked "
             f"from a parent per contender that has imported `torch`, `boto3` and the contender's own module: "
             f"`bench/zygote.py`, measured equal to a fresh process); the figure is the "
             f"median over {r['peers'][0]['rounds']} rounds (stall and save → durable: of every steady-state save, "
             "the first save of each process, which allocates buffers and builds clients, left out). Stall: the "
             "`save` call in the training thread. Save → durable: from that call until the checkpoint is complete "
             "on the remote. Restore: a process with `torch`, `boto3` and the contender's own module imported, "
             "the garbage collection those imports left pending run and the model allocated, from an empty local dir to the newest checkpoint's values in the model (clients, "
             "lazy imports, listings inside the clock). Loop: a CPU-bound single-thread loop, alone and then saving "
             "every few seconds (a save that comes due while the previous one is not durable yet first waits for it "
             "in the training thread, for every contender: all save as often). Every boto3 client uses the settings above and spotckpt's transfer sizes (16 MiB "
             "parts × 8 up, 64 MiB ranges × 8 down); every s3fs (DCP's fsspec writer, Lightning's `s3://` paths, "
             "`torch.save` into an s3fs file) the same botocore settings; each keeps the last two checkpoints.", ""]
    for res in r["peers"]:
        loop = res.get("loop")
        lines += [f"### {human(res['bytes'])} state" + (f" (loop: save every {loop['interval']:g} s, "
                                                          f"{loop['seconds']:g} s of steps)" if loop else ""), ""]
        t, _ = table(res)
        lines += t + [""]
        for name, err in res.get("failed", {}).items():  # could not run against this server
            lines += [f"- {LABELS[name]}: failed against this server: `{err}`", ""]
    lines += ["### Targets (ratios to the best peer in the same run)", ""]
    rows = []
    for res in r["peers"]:
        _, verdicts = table(res)
        rows += verdict_rows(verdicts, _why(res, r))[2 if rows else 0:]
    lines += rows
    pl = r.get("peer_loop")
    if pl:
        lp = pl["loop"]
        lines += ["", f"### CPU-bound loop, {human(pl['bytes'])} state: {lp['steps']} steps alone and saving every "
                  f"{lp['interval']:g} s, alternated ({lp['pairs']} pairs per contender, {pl['rounds']} round(s))", ""]
        t, verdicts = table(pl)
        lines += t + [""] + verdict_rows(verdicts, _why(pl))
    pm = r.get("peers_moto")
    if pm:
        lines += ["", f"### Second column: the same peers at {human(pm['bytes'])} on moto", ""]
        lines += table(pm)[0]
    return lines + scale_section(r, svg_path, svg_ref)


def scale_section(r: dict[str, Any], svg_path: Path, svg_ref: str) -> list[str]:
    """The scale curve (plot, table) and the largest state durable per grace period."""
    if not r.get("scale"):
        return []
    server = r.get("server", "moto")
    full = merge_scale(r)
    svg(full, svg_path, f"save → durable and restore against state size ({server})")
    lines = ["", "## Scale curve", "", f"![scale curve]({svg_ref})", ""] + scale_table(full)
    rows_, model = durable_within(full)
    lines += ["", f"Largest state durable within a grace period on {server} (spotckpt, a periodic save at the "
              "notice, from the scale curve):", "", "| grace | largest state |", "|---|---|"] + rows_
    return lines + ["", model]


def merge_scale(r: dict[str, Any]) -> dict[str, Any]:
    """The scale run's points plus those of the peer tables (same contenders), by size."""
    sc = r["scale"]
    names = sc["names"]
    pts: dict[str, dict[int, dict[str, float]]] = {n: {p["bytes"]: p for p in sc["points"][n]} for n in names}
    for res in r.get("peers", []):
        s = summary(res)
        for n in names:
            if n in s:
                pts[n][res["bytes"]] = {"bytes": res["bytes"], **s[n]}
    sizes = sorted({b for n in names for b in pts[n]})
    return {"sizes": sizes, "names": names, "points": {n: [pts[n][b] for b in sizes] for n in names}}
