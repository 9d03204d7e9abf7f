"""Reaching a phase of a real process deterministically: the events log's test-only pause
hook (``spotckpt._events._test_pause``). A process started with :meth:`Pauses.env` stops in
the thread that writes a named event (``pull_start``, ``supervisor:child_exit``,
``checkpointer:saved``, ...) until the test releases it; the test signals it there. No sleep
guesses at when a phase runs."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


class Pauses:
    """Pause points for one test's processes (a dir of marker files)."""

    def __init__(self, d: Path, *entries: str) -> None:
        self.dir, self.entries = d, entries
        d.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        return {"SPOTCKPT_TEST_PAUSE_AT": ",".join(self.entries), "SPOTCKPT_TEST_PAUSE_DIR": str(self.dir)}

    def paused(self, entry: str) -> list[int]:
        """The pids paused at ``entry`` so far."""
        return sorted(int(p.name[len(entry) + 1:-len(".paused")]) for p in self.dir.glob(f"{glob_escape(entry)}.*.paused"))

    def wait(self, entry: str, *, count: int = 1, timeout: float = 180.0,
             proc: subprocess.Popen | None = None) -> list[int]:
        """Wait until ``count`` processes are paused at ``entry``; returns their pids.

        Raises:
            AssertionError: ``proc`` exited first, or the timeout passed.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pids = self.paused(entry)
            if len(pids) >= count:
                return pids
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode} before pausing at {entry}")
            time.sleep(0.02)
        raise AssertionError(f"nothing paused at {entry} within {timeout} s")

    def release(self, entry: str) -> None:
        (self.dir / f"{entry}.go").touch()

    def release_all(self) -> None:
        for e in self.entries:
            self.release(e)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
