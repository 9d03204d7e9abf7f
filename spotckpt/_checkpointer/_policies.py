"""Save-decision policies that compose with ``|`` and take an injected clock.

Example:
    >>> p = EverySteps(500) | EverySeconds(600, clock=fake_clock)  # doctest: +SKIP
    >>> p.due(step=1000)

:class:`AutoInterval` is ``every="auto"``: an interval in seconds that a ``decide()``
callable chooses (:mod:`._schedule`), re-evaluated after every save and every ``recheck``
seconds as the estimates move.
"""
from __future__ import annotations

import time
from typing import Any, Callable


class Policy:
    def due(self, step: int) -> bool:
        raise NotImplementedError

    def saved(self, step: int) -> None:
        """Called after every save, whatever triggered it."""

    def __or__(self, other: Policy) -> Policy:
        return AnyOf(self, other)


class Never(Policy):
    def due(self, step: int) -> bool:
        return False


class EverySteps(Policy):
    def __init__(self, n: int) -> None:
        self.n = n

    def due(self, step: int) -> bool:
        return step > 0 and step % self.n == 0


class EverySeconds(Policy):
    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = seconds, clock
        self._last = clock()

    def due(self, step: int) -> bool:
        return self.clock() - self._last >= self.seconds

    def saved(self, step: int) -> None:
        self._last = self.clock()


class AutoInterval(Policy):
    """Save when ``decide().interval`` seconds of ``clock`` have passed since the last save.

    Args:
        decide: returns the current :class:`._schedule.Decision` (cheap, no I/O).
        recheck: seconds between re-evaluations while no save happens (the failure rate
            falls as the job runs without one); after a save it is re-evaluated at once.
        on_change: called with each decision made, new or the same.

    Example:
        >>> t = [0.0]; p = AutoInterval(lambda: decision, clock=lambda: t[0])  # doctest: +SKIP
        >>> t[0] = decision.interval; p.due(1)
        True
    """

    def __init__(self, decide: Callable[[], Any], *, clock: Callable[[], float] = time.monotonic,
                 recheck: float = 30.0, on_change: Callable[[Any], None] | None = None) -> None:
        self.decide, self.clock, self.recheck, self.on_change = decide, clock, recheck, on_change
        self._last = self._checked = clock()
        self.decision = decide()
        if on_change is not None:
            on_change(self.decision)

    def refresh(self) -> None:
        """Re-evaluate now (the Checkpointer calls it when a new measurement arrives)."""
        self._checked = self.clock()
        self.decision = self.decide()
        if self.on_change is not None:
            self.on_change(self.decision)

    @property
    def interval(self) -> float:
        return float(self.decision.interval)

    def due(self, step: int) -> bool:
        now = self.clock()
        if now - self._checked >= self.recheck:
            self.refresh()
        return now - self._last >= self.interval

    def saved(self, step: int) -> None:
        self._last = self.clock()
        self.refresh()


class AnyOf(Policy):
    def __init__(self, *policies: Policy) -> None:
        self.policies = policies

    def due(self, step: int) -> bool:
        return any(p.due(step) for p in self.policies)

    def saved(self, step: int) -> None:
        for p in self.policies:
            p.saved(step)


def make_policy(every_steps: int | None, every_seconds: float | None,
                clock: Callable[[], float] = time.monotonic) -> Policy:
    parts: list[Policy] = []
    if every_steps:
        parts.append(EverySteps(every_steps))
    if every_seconds:
        parts.append(EverySeconds(every_seconds, clock=clock))
    if not parts:
        return Never()
    return parts[0] if len(parts) == 1 else AnyOf(*parts)
