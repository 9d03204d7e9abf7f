"""Interruption traces for ``spotckpt spot``: when, in seconds of training time, the emulated
instance is interrupted, and whether a notice comes first.

Process layer, no I/O but reading a trace file. A trace is a sorted list of
:class:`Point`; ``notice`` True is a spot interruption (SIGTERM, SIGKILL after the grace),
False a failure without warning (SIGKILL at once: a hardware fault, a host lost, a notice
that never arrived). Sources:

- a file (``--interrupt-trace``): one point per line, ``<seconds> [notice|kill]``
  (default ``notice``), ``#`` comments and blank lines ignored;
- Poisson processes at a rate per hour of training (``--interrupt-rate`` with notice,
  ``--kill-rate`` without), seeded;
- the AWS Spot Instance Advisor's frequency bands (``--advisor-band``): a band ("<5%",
  "5-10%", "10-15%", "15-20%", ">20%" of instances interrupted per month) stands for a
  monthly interruption probability ``p`` drawn uniformly inside it (">20%": 20-40%; "mixed":
  the band itself drawn first, each alike), turned into a Poisson rate ``-ln(1 - p)`` per
  30-day month of running; the points come with a notice, a fraction ``--no-notice`` of them
  without.

``--time-scale K`` makes one emulated second stand for K seconds of a trace file and of
the advisor's month (a month is 30 x 86400 / K emulated seconds), so a month-long trace
replays in minutes; ``--interrupt-at``, ``--kill-at`` and the hourly rates are in emulated
seconds as given.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

from spotckpt._errors import ConfigError

MONTH = 30 * 86400.0
ADVISOR_BANDS: dict[str, tuple[float, float]] = {
    "<5%": (0.0, 0.05), "5-10%": (0.05, 0.10), "10-15%": (0.10, 0.15), "15-20%": (0.15, 0.20), ">20%": (0.20, 0.40),
}
BAND_CHOICES = (*ADVISOR_BANDS, "mixed")
_KINDS = {"notice": True, "sigterm": True, "term": True, "kill": False, "hard": False, "hard-kill": False,
          "sigkill": False}


@dataclasses.dataclass(frozen=True, order=True)
class Point:
    """One interruption: ``at`` seconds of training time; ``notice``: SIGTERM first."""

    at: float
    source: str = dataclasses.field(compare=False)
    notice: bool = dataclasses.field(default=True, compare=False)


def read_trace(path: str | Path, *, scale: float = 1.0) -> list[Point]:
    """The points of a trace file, their times divided by ``scale``.

    Raises:
        ConfigError: one line naming the file and line (a missing file, a bad number, an
            unknown kind).
    """
    name = "--interrupt-trace"
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"spotckpt spot: {name} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"spotckpt spot: {name} {path}: not a text file") from None
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].replace(",", " ").split()
        if not line:
            continue
        if len(line) > 2:
            raise ConfigError(f"spotckpt spot: {name} {path}:{n}: {raw.strip()!r}: expected '<seconds> [notice|kill]'")
        try:
            t = float(line[0])
        except ValueError:
            t = float("nan")
        if not math.isfinite(t) or t < 0:
            raise ConfigError(f"spotckpt spot: {name} {path}:{n}: {line[0]!r} is not a number of seconds >= 0")
        kind = line[1].lower() if len(line) > 1 else "notice"
        if kind not in _KINDS:
            raise ConfigError(f"spotckpt spot: {name} {path}:{n}: {line[1]!r}: use 'notice' (SIGTERM, then "
                              "SIGKILL after the grace) or 'kill' (SIGKILL without warning)")
        out.append(Point(round(t / scale, 3), "trace", _KINDS[kind]))
    return sorted(out)


def poisson(rate_per_hour: float, horizon: float, rng: random.Random, *, source: str,
            notice: bool = True) -> list[Point]:
    """A Poisson process of ``rate_per_hour`` up to ``horizon`` seconds."""
    out: list[Point] = []
    if rate_per_hour <= 0:
        return out
    t = 0.0
    while True:
        t += rng.expovariate(rate_per_hour / 3600.0)
        if t >= horizon:
            return out
        out.append(Point(round(t, 3), source, notice))


def advisor_rate(band: str, rng: random.Random) -> tuple[str, float]:
    """(the band, interruptions per month of running) for an advisor ``band`` ("mixed": drawn)."""
    if band == "mixed":
        band = rng.choice(list(ADVISOR_BANDS))
    lo, hi = ADVISOR_BANDS[band]
    p = rng.uniform(lo, hi)
    return band, -math.log(1.0 - p)


def advisor(band: str, horizon: float, rng: random.Random, *, scale: float = 1.0,
            no_notice: float = 0.0) -> list[Point]:
    """Interruptions of an instance in advisor ``band`` over ``horizon`` emulated seconds,
    a month being ``MONTH / scale`` of them; a fraction ``no_notice`` without a notice."""
    band, per_month = advisor_rate(band, rng)
    per_hour = per_month / (MONTH / scale) * 3600.0
    pts = poisson(per_hour, horizon, rng, source=f"advisor {band}")
    return [dataclasses.replace(p, notice=rng.random() >= no_notice) for p in pts]


def schedule(*, at: list[float], kill_at: list[float], rate: float, kill_rate: float, seed: int, horizon: float,
             trace: str | None = None, band: str | None = None, scale: float = 1.0,
             no_notice: float = 0.0) -> list[Point]:
    """Every source together, sorted (one seeded generator for the random ones)."""
    rng = random.Random(seed)
    pts = [Point(t, "interrupt-at") for t in at] + [Point(t, "kill-at", False) for t in kill_at]
    pts += [dataclasses.replace(p, notice=rng.random() >= no_notice)
            for p in poisson(rate, horizon, rng, source="interrupt-rate")]
    pts += poisson(kill_rate, horizon, rng, source="kill-rate", notice=False)
    if trace:
        pts += read_trace(trace, scale=scale)
    if band:
        pts += advisor(band, horizon, rng, scale=scale, no_notice=no_notice)
    return sorted(pts)


__all__ = ["ADVISOR_BANDS", "BAND_CHOICES", "MONTH", "Point", "advisor", "advisor_rate", "poisson", "read_trace",
           "schedule"]
