"""``spotckpt spot``'s options, checked by argparse, and its interruption schedule."""
from __future__ import annotations

import argparse
import math
import random
from typing import Any

from spotckpt._errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from spotckpt._config import number  # every number is checked by argparse: a bad one is exit 2 at once
    p.add_argument("--local-dir", metavar="DIR", help="the instance's checkpoint dir, emptied before each "
                   "start (default: <workdir>/checkpoints; must be empty if given)")
    p.add_argument("--remote", metavar="URL", help="checkpoint S3 URI (SPOTCKPT_REMOTE; default file://<workdir>/remote/)")
    p.add_argument("--max-run", type=number(gt=0), default=3600.0, metavar="S",
                   help="MaxRuntimeInSeconds: instance seconds, all starts together (default 3600)")
    p.add_argument("--max-wait", type=number(gt=0), metavar="S",
                   help="MaxWaitTimeInSeconds: wall clock incl. capacity waits; > --max-run (default 2 x max-run)")
    p.add_argument("--interrupt-at", type=_seconds_list("--interrupt-at"), metavar="T1,T2", default="",
                   help="interrupt at these seconds of training time (all starts together)")
    p.add_argument("--interrupt-rate", type=number(ge=0), default=0.0, metavar="N",
                   help="also interrupt at random, N times per hour of training on average")
    p.add_argument("--kill-at", type=_seconds_list("--kill-at"), metavar="T1,T2", default="",
                   help="kill the instance without warning (SIGKILL, no SIGTERM) at these seconds of training time")
    p.add_argument("--kill-rate", type=number(ge=0), default=0.0, metavar="N",
                   help="also kill without warning at random, N times per hour of training on average")
    p.add_argument("--interrupt-trace", metavar="FILE",
                   help="replay the interruptions in FILE: one '<seconds of training> [notice|kill]' per line")
    from ._traces import BAND_CHOICES
    p.add_argument("--advisor-band", choices=BAND_CHOICES, metavar="BAND",
                   help="interrupt at random as an instance of this AWS Spot Instance Advisor band would be: "
                        f"{', '.join(BAND_CHOICES)} (of instances interrupted per month; see --time-scale)"
                        .replace("%", "%%"))  # (argparse formats help with %)
    p.add_argument("--no-notice", type=number(ge=0, le=1), default=0.0, metavar="F",
                   help="the share of --interrupt-rate and --advisor-band interruptions that come without a "
                        "notice (SIGKILL at once; default 0)")
    p.add_argument("--time-scale", type=number(gt=0), default=1.0, metavar="K",
                   help="one emulated second stands for K seconds of --interrupt-trace's times and of "
                        "--advisor-band's month (default 1; 3600: a month in 12 minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed for --interrupt-rate, --kill-rate and --advisor-band "
                   "(default 0)")
    p.add_argument("--capacity-wait", type=_seconds_list("--capacity-wait", allow_inf=True), default="0.5", metavar="S[,S...]",
                   help="seconds to wait for capacity before each start, the last value repeats; "
                        "'inf' never gets capacity (default 0.5)")
    p.add_argument("--grace", type=number(gt=0), default=120.0, metavar="S",
                   help="seconds from SIGTERM to SIGKILL at an interruption or stop (default 120, as SageMaker)")
    p.add_argument("--spot-discount", type=number(ge=0, lt=1), default=0.7, metavar="F",
                   help="spot price discount for the bill, 0..1 (default 0.7)")
    p.add_argument("--job-name", help="TrainingJobName (default spotckpt-<time>)")
    p.add_argument("--workdir", metavar="DIR", help="where the report, logs and default dirs go (default: a new temp dir)")
    p.add_argument("--report", metavar="FILE", help="write the DescribeTrainingJob-like JSON here "
                   "(default <workdir>/describe-training-job.json)")
    p.add_argument("--scan-interval", "--stable-seconds", type=number(gt=0), default=0.5, metavar="S",
                   dest="scan_interval", help="passed to `spotckpt run`: seconds between scans of the watched dir")
    p.add_argument("--dir-checkpoint", action="append", default=[], metavar="GLOB:MARKER",
                   help="passed to `spotckpt run` (repeatable)")
    from spotckpt._sagemaker import add_run_arguments
    add_run_arguments(p, spot=True)
    p.add_argument("--json", action="store_true", help="print the JSON report to stdout at the end "
                   "(the only thing on stdout: status lines and the command's output go to stderr)")


def _seconds_list(name: str, *, allow_inf: bool = False) -> Any:
    def parse(text: str) -> str:
        try:
            _floats(name, text, allow_inf=allow_inf)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).replace(f"spotckpt spot: {name} ", "")) from None
        return text
    return parse


def _floats(name: str, text: str, *, allow_inf: bool = False) -> list[float]:
    out = []
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        try:
            x = float(item)
        except ValueError:
            raise ConfigError(f"spotckpt spot: {name} {item!r} is not a number of seconds") from None
        if x < 0 or (math.isinf(x) and not allow_inf) or math.isnan(x):
            raise ConfigError(f"spotckpt spot: {name} {item!r} must be a number of seconds >= 0")
        out.append(x)
    return out


def interruption_schedule(at: list[float], rate_per_hour: float, seed: int, horizon: float) -> list[tuple[float, str]]:
    """Points of training time at which to interrupt: the given ones plus a Poisson process
    of ``rate_per_hour`` (seeded), up to ``horizon`` seconds."""
    points = [(t, "interrupt-at") for t in at]
    if rate_per_hour > 0:
        rng, t = random.Random(seed), 0.0
        while True:
            t += rng.expovariate(rate_per_hour / 3600.0)
            if t >= horizon:
                break
            points.append((round(t, 3), "interrupt-rate"))
    return sorted(points)


__all__ = ["add_arguments", "interruption_schedule"]
