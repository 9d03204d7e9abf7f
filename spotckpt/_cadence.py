"""The save cadence: a fixed one (``every_steps``, ``every_seconds``) or ``every="auto"``
and its settings, checked where they are written (the Checkpointer's and each callback's
constructor) and again by :meth:`spotckpt._config.Config.resolve`.

Base layer (below :mod:`spotckpt._config`, which reads it). The policy that uses these
settings: ``spotckpt/_checkpointer/_schedule.py``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from spotckpt._errors import ConfigError

# every="auto": the interval stays in [min, max]
DEFAULT_MIN_INTERVAL = 60.0     # seconds: below a minute the saves themselves become the work
DEFAULT_MAX_INTERVAL = 7200.0   # seconds: a kill without warning never costs more than two hours of work
                                # (docs/design.md: Young/Daly then stays within 6% of its optimum
                                # up to an MTBF of 4 h^2/C: a month for C = 20 s)
DEFAULT_MTBF_HOURS = 2.0        # prior: one failure without a usable warning per 2 h (weighted lightly:
                                # spotckpt/_checkpointer/_schedule.py, PRIOR_WEIGHT)

CADENCE_ENV = ("SPOTCKPT_EVERY", "SPOTCKPT_EVERY_STEPS", "SPOTCKPT_EVERY_SECONDS")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The settings of ``every="auto"`` (the policy itself: ``spotckpt/_checkpointer/_schedule.py``).

    ``failure_rate`` is the prior for failures without a usable warning, per second of
    training; ``source`` says where it came from (an argument, a variable, the default).
    """

    min_interval: float = DEFAULT_MIN_INTERVAL
    max_interval: float = DEFAULT_MAX_INTERVAL
    failure_rate: float = 1.0 / (DEFAULT_MTBF_HOURS * 3600.0)
    source: str = f"the default, one per {DEFAULT_MTBF_HOURS:g} h of training"


def resolve_schedule(*, every: Any = None, failure_rate: Any = None, mtbf: Any = None,
                     min_interval: Any = None, max_interval: Any = None, every_steps: Any = None,
                     every_seconds: Any = None, env: Mapping[str, str] | None = None,
                     steps_name: str = "every_steps") -> Schedule | None:
    """Check the cadence settings; the :class:`Schedule` of ``every="auto"``, or None for a
    fixed cadence (``every_steps``/``every_seconds``, or none). Called by the Checkpointer's
    and each callback's constructor, so a bad setting fails where it is written.

    Arguments win over variables: with any cadence argument given (``every``,
    ``every_steps``, ``every_seconds``) the ``SPOTCKPT_EVERY*`` variables are not read.
    ``steps_name``: what the caller calls ``every_steps`` (a callback's ``every_n_batches``).

    Raises:
        ConfigError: one line naming the setting: ``every`` other than ``"auto"``,
            ``every="auto"`` together with ``every_steps``/``every_seconds`` (or the same
            in variables), a negative or non-finite ``failure_rate``, ``mtbf`` <= 0, both
            of them, ``min_interval`` > ``max_interval``, or a setting of ``every="auto"``
            given without it.

    Example:
        >>> resolve_schedule(every="auto", mtbf=12, env={}).failure_rate * 3600  # doctest: +SKIP
        0.0833...
    """
    env = os.environ if env is None else env
    args = every is not None or every_steps is not None or every_seconds is not None

    def pick(value: Any, var: str) -> tuple[Any, str]:
        if value is not None:
            return value, var.removeprefix("SPOTCKPT_").lower()
        return (env.get(var) or None), var
    if args:
        how, fixed, where = every, [n for n, v in ((steps_name, every_steps),
                                                    ("every_seconds", every_seconds)) if v is not None], ""
    else:
        how = env.get("SPOTCKPT_EVERY") or None
        fixed = [n for n in ("SPOTCKPT_EVERY_STEPS", "SPOTCKPT_EVERY_SECONDS") if env.get(n)]
        where = " (SPOTCKPT_EVERY)"
    if how is not None and (not isinstance(how, str) or how.strip().lower() != "auto"):
        raise ConfigError(f"spotckpt: every={how!r}{where} is not a schedule; use every='auto' (the interval "
                          "chosen from measured costs), or every_steps= / every_seconds= for a fixed one")
    auto_args = {n: v for n, v in (("failure_rate", failure_rate), ("mtbf", mtbf), ("min_interval", min_interval),
                                   ("max_interval", max_interval)) if v is not None}
    if how is None:
        if auto_args:
            n = next(iter(auto_args))
            raise ConfigError(f"spotckpt: {n}= is a setting of every='auto' and would be ignored here; "
                              f"pass every='auto' too, or drop {n}=")
        return None
    if fixed:
        names = " and ".join(fixed)
        raise ConfigError(f"spotckpt: every='auto'{where} together with {names}: choose one (auto picks the "
                          f"interval itself, {names} fixes it)")
    lo_v, lo_n = pick(min_interval, "SPOTCKPT_MIN_INTERVAL")
    hi_v, hi_n = pick(max_interval, "SPOTCKPT_MAX_INTERVAL")
    lo = DEFAULT_MIN_INTERVAL if lo_v is None else _number(lo_n, lo_v, "seconds", allow_zero=False)
    hi = DEFAULT_MAX_INTERVAL if hi_v is None else _number(hi_n, hi_v, "seconds", allow_zero=False)
    if lo > hi:
        hi_what = f"{hi_n}={hi:g} s" if hi_v is not None else f"max_interval={hi:g} s (the default)"
        raise ConfigError(f"spotckpt: {lo_n}={lo:g} s is larger than {hi_what}; make min_interval <= max_interval")
    rate_v, rate_n = pick(failure_rate, "SPOTCKPT_FAILURE_RATE")
    mtbf_v, mtbf_n = pick(mtbf, "SPOTCKPT_MTBF")
    if rate_v is not None and mtbf_v is not None:
        raise ConfigError(f"spotckpt: {rate_n} and {mtbf_n} both given; they are one setting "
                          "(failure_rate = 1 / mtbf): give one")
    sched = Schedule(min_interval=lo, max_interval=hi)
    if rate_v is not None:
        r = _number(rate_n, rate_v, "failures per hour of training", allow_zero=True)
        return dataclasses.replace(sched, failure_rate=r / 3600.0, source=f"{rate_n}={r:g} per hour")
    if mtbf_v is not None:
        m = _number(mtbf_n, mtbf_v, "hours of training between failures", allow_zero=False)
        return dataclasses.replace(sched, failure_rate=1.0 / (m * 3600.0), source=f"{mtbf_n}={m:g} h")
    return sched


def _number(name: str, value: Any, unit: str, *, allow_zero: bool) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if math.isnan(x) or math.isinf(x) or x < 0 or (x == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"spotckpt: {name}={value!r} must be a finite number {bound} ({unit})")
    return x
