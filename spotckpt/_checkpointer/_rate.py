"""``every="auto"``: λ, the rate of failures without a usable warning, from the job's own
interruption history (the other input of :mod:`._schedule`, whose Young/Daly interval it
feeds).

User-API layer, no I/O: a history summary in, a :class:`Rate` out.

The history is a list of *stretches* of running time (:func:`stretches`), one per
incarnation, each ended by a failure or not (a notice save that completed, when it fits the
grace). The model: failures come as a Poisson process whose rate is constant within a
*regime*; at each restart after a failure the rate may change (probability ``h`` =
:data:`CHANGE_PRIOR`), a new rate then drawn from the prior ``Gamma(a, a / r0)`` (``r0``
the prior rate, ``a`` = :data:`PRIOR_WEIGHT` its weight in failures). λ is the posterior
mean of the current rate (:func:`failure_rate`): over every restart where the current
regime may have begun, ``Σ w_j · (n_j + a) / (T_j + a / r0)`` with ``n_j``, ``T_j`` the
failures and running time since restart ``j`` and ``w_j`` its posterior weight (Adams &
MacKay's run-length recursion, exact here since the stretches are few: :func:`regimes`).

Why this form: a regime that began at restart ``j`` is believed as much as the record
since ``j`` is better explained by a rate of its own than by the rate before it (the
marginal likelihoods of the Gamma-Poisson model, which charge a new regime for its own
uncertainty, so a steady record keeps one rate). So a burst of kills that stopped stops
counting as the quiet says so (5 kills in 50 min, then quiet: λ is half the one-rate
estimate after 1.6 quiet hours and a fifth after 3; the thresholded change-point test
before dropped them at once after ~5 h), and a burst that starts after weeks of quiet
counts at once. With one regime (no evidence of a change) it is ``(n + a) / (T + a / r0)``
over the whole history, as for a steady rate. The price: right after a restart that
followed a failure, the chance ``h`` of a new rate at the prior's raises λ until this
incarnation's own running time says more (an hour or two).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

PRIOR_WEIGHT = 0.25   # the prior counts as a quarter of a failure: the job's own record soon decides
CHANGE_PRIOR = 0.02   # the chance that the rate changed at a restart after a failure (a new rate from the prior)


def counted(ended: dict[str, int], *, notice_fits: bool) -> int:
    """The failures without a usable warning among endings ``{how: count}``."""
    n = ended.get("hard-kill", 0) + ended.get("notice-late", 0)
    return n + (0 if notice_fits else ended.get("notice-saved", 0))


def unwarned_rate(ended: dict[str, int], t: float, prior: float, *, notice_fits: bool) -> tuple[float, int]:
    """λ (per second) and the number of failures it counts, from the history's endings,
    ``t`` seconds of running time and the ``prior`` rate (weight :data:`PRIOR_WEIGHT`), one
    rate over all."""
    n = counted(ended, notice_fits=notice_fits)
    if prior > 0:
        return (n + PRIOR_WEIGHT) / (t + PRIOR_WEIGHT / prior), n
    return (n / t if t > 0 else 0.0), n


def stretches(summ: dict[str, Any], ran: float, *, notice_fits: bool) -> list[tuple[float, int]]:
    """The job's running time as ``(seconds, failures counted)`` stretches, oldest first, from
    a history summary (:func:`spotckpt._remote._history.summary`): the ended incarnations no
    longer listed as one stretch (their failures taken at its end), then each listed one (a
    failure ends it), then this one's ``ran`` seconds so far. A summary without ``runs`` (an
    older version's): the totals as one stretch."""
    runs = [r for r in (summ.get("runs") or []) if isinstance(r, (list, tuple)) and len(r) == 2]
    listed = [(max(0.0, float(s)), counted({str(how): 1}, notice_fits=notice_fits)) for s, how in runs
              if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)]
    n_all = counted(summ.get("ended") or {}, notice_fits=notice_fits)
    t_all = float(summ.get("run_s") or 0.0)
    older = (max(0.0, t_all - sum(s for s, _ in listed)), max(0, n_all - sum(n for _, n in listed)))
    return [x for x in (older, *listed) if x[0] > 0 or x[1] > 0] + [(max(0.0, ran), 0)]


def _lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


@functools.lru_cache(maxsize=64)
def _ended(parts: tuple[tuple[float, int], ...], a: float, b: float, h: float) -> tuple[tuple[float, int, int, float], ...]:
    """The run-length posterior after the ended stretches ``parts``: ``(log weight, start,
    failures, seconds)`` per possible start of the current regime, a change allowed before
    each stretch that follows a failure. Cached: within an incarnation only its own running
    time moves (:func:`regimes` adds it)."""
    hyps: list[tuple[float, int, int, float]] = []
    for k, (s, f) in enumerate(parts):
        if not hyps:
            hyps = [(0.0, 0, 0, 0.0)]
        elif parts[k - 1][1] > 0:
            z = _lse([w for w, *_ in hyps])
            hyps = [(w + math.log1p(-h), j, n, t) for w, j, n, t in hyps] + [(z + math.log(h), k, 0, 0.0)]
        # the Gamma-Poisson predictive of f failures in s seconds after n in t (the s^f/f! all share)
        hyps = [(w + math.lgamma(a + n + f) - math.lgamma(a + n) + (a + n) * math.log(b + t)
                 - (a + n + f) * math.log(b + t + s), j, n + f, t + s) for w, j, n, t in hyps]
        z = _lse([w for w, *_ in hyps])
        hyps = [(w - z, j, n, t) for w, j, n, t in hyps]
    return tuple(hyps)


def regimes(parts: list[tuple[float, int]], prior: float, *, h: float | None = None,
            a: float = PRIOR_WEIGHT) -> list[tuple[float, int, int, float]]:
    """Where the current failure rate began: ``(weight, start, failures, seconds)`` for each
    index ``start`` into ``parts`` (:func:`stretches`; the last one is this incarnation, with
    no failure) where it may have begun, the weights summing to 1; ``failures`` and
    ``seconds`` count from ``start`` to now. ``prior``: the prior rate ``r0`` (per second, >
    0), the rate of a new regime before its own record says more; ``h``: the chance of a
    change at a restart after a failure (default :data:`CHANGE_PRIOR`).

    Example (5 kills 10 min apart, then 2 h of quiet running):
        >>> [round(w, 2) for w, *_ in regimes([(600.0, 1)] * 5 + [(7200.0, 0)], 1 / 7200)]  # doctest: +SKIP
        [0.35, 0.0, 0.0, 0.01, 0.03, 0.6]
    """
    h = CHANGE_PRIOR if h is None else h
    b = a / prior
    *done, (s, f) = parts
    hyps = list(_ended(tuple(done), a, b, h)) if done else []
    if not hyps:
        hyps = [(0.0, 0, 0, 0.0)]
    elif done[-1][1] > 0:
        z = _lse([w for w, *_ in hyps])
        hyps = [(w + math.log1p(-h), j, n, t) for w, j, n, t in hyps] + [(z + math.log(h), len(done), 0, 0.0)]
    hyps = [(w + math.lgamma(a + n + f) - math.lgamma(a + n) + (a + n) * math.log(b + t)
             - (a + n + f) * math.log(b + t + s), j, n + f, t + s) for w, j, n, t in hyps]
    z = _lse([w for w, *_ in hyps])
    return [(math.exp(w - z), j, n, t) for w, j, n, t in hyps]


@dataclasses.dataclass(frozen=True)
class Rate:
    """λ and what it counts: ``n`` failures without a usable warning in ``t`` seconds of
    running since the current rate most likely began (posterior ``weight``); before it,
    ``n_before`` in ``t_before`` (both 0: the whole history is most likely one rate)."""

    rate: float
    n: int
    t: float
    n_before: int = 0
    t_before: float = 0.0
    weight: float = 1.0

    def note(self) -> str:
        if not self.t_before and not self.n_before:
            return f"{self.n} failure(s) without usable warning in {self.t / 3600:.3g} h of running"
        return (f"{self.n} failure(s) without usable warning in the last {self.t / 3600:.3g} h of running (the "
                f"rate most likely changed there, posterior {100 * self.weight:.0f}%, after {self.n_before} in the "
                f"{self.t_before / 3600:.3g} h before)")


def failure_rate(parts: list[tuple[float, int]], prior: float) -> Rate:
    """λ (per second): the posterior mean ``Σ w_j · (n_j + a) / (t_j + a / r0)`` over where
    the current rate may have begun (:func:`regimes`), ``a`` = :data:`PRIOR_WEIGHT`, ``r0``
    the ``prior``. Without a prior (``prior`` 0: ``failure_rate=0``) the record's own
    overall rate serves as one (no failure counted: 0)."""
    n_all, t_all = sum(f for _, f in parts), sum(s for s, _ in parts)
    if prior <= 0:
        if n_all == 0 or t_all <= 0:
            return Rate(0.0, n_all, t_all)
        prior = n_all / t_all
    hyps = regimes(parts, prior)
    b = PRIOR_WEIGHT / prior
    lam = sum(w * (PRIOR_WEIGHT + n) / (b + t) for w, _, n, t in hyps)
    w, j, n, t = max(hyps, key=lambda x: x[0])
    return Rate(lam, n, t, n_all - n, t_all - t, w)


__all__ = ["CHANGE_PRIOR", "PRIOR_WEIGHT", "Rate", "counted", "failure_rate", "regimes", "stretches",
           "unwarned_rate"]
