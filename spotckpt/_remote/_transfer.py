"""Progress of one fsspec transfer, reported to a hook (sync layer; used by :mod:`._store`)."""
from __future__ import annotations

from typing import Any, Callable


class Transfer:
    """Reports the bytes of one transfer to a progress hook (fsspec callback where the
    filesystem supports one; the whole size at the end where it does not, as for file://)."""

    def __init__(self, hook: Callable[[int], None] | None, total: int | None) -> None:
        self.hook, self.total, self.done = hook, total, 0
        self.kwargs: dict[str, Any] = {}
        if hook is not None:
            from fsspec.callbacks import Callback

            outer = self

            class _CB(Callback):
                def relative_update(self, inc: int = 1) -> None:
                    outer._add(int(inc))

            self.kwargs = {"callback": _CB()}

    def _add(self, n: int) -> None:
        if self.hook is not None and n > 0:
            self.done += n
            self.hook(n)

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None and self.total is not None and self.total > self.done:
            self._add(self.total - self.done)
