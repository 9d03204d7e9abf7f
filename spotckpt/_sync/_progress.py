"""A one-line progress bar for pulls and pushes, drawn only on a terminal."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """``label [#####.....]  45%  12.3 MB / 27.0 MB  5.2 MB/s`` on one redrawn line.

    Args:
        enabled: draw at all; default: only when ``stream`` is a terminal.

    Example:
        >>> bar = Progress("pull"); bar.set_total(10_000_000); bar.add(4_000_000); bar.close()  # doctest: +SKIP
    """

    def __init__(self, label: str, *, stream: TextIO | None = None, enabled: bool | None = None,
                 interval: float = 0.1) -> None:
        self.label, self.stream = label, stream or sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = isatty() if enabled is None else enabled
        self.interval = interval
        self.total: int | None = None
        self.done = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def set_total(self, total: int) -> None:
        self.total = total

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self._t0, 1e-6)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
            text = (f"{self.label} [{bar}] {frac * 100:3.0f}%  {human_bytes(min(self.done, self.total))}"
                    f" / {human_bytes(self.total)}  {human_bytes(rate)}/s")
        else:
            text = f"{self.label}  {human_bytes(self.done)}  {human_bytes(rate)}/s"
        self.stream.write("\r" + text.ljust(78))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and (self._drawn or self.done):
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
