"""Save-decision policies that compose with ``|`` and take an injected clock.

Example:
    >>> p = EverySteps(500) | EverySeconds(600, clock=fake_clock)  # doctest: +SKIP
    >>> p.due(step=1000)
"""
from __future__ import annotations

import time
from typing import Callable


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
