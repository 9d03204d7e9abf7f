"""Helpers for tests that drive real `spotckpt` processes: line capture and waiting."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PY = sys.executable


def spotckpt(*args: str) -> list[str]:
    return [PY, "-m", "spotckpt", *args]


class Proc:
    """A subprocess whose stdout and stderr lines are collected as they arrive."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, **kw) -> None:
        e = dict(os.environ if env is None else env)
        e.setdefault("PYTHONUNBUFFERED", "1")
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=e, cwd=cwd, **kw)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.p.stdout, self.out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.p.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.p.pid

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    def wait_for(self, pattern: str, timeout: float = 30.0, *, stream: str = "out") -> re.Match:
        rx = re.compile(pattern)
        sink = self.out if stream == "out" else self.err
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            while seen < len(sink):
                m = rx.search(sink[seen])
                seen += 1
                if m:
                    return m
            if self.p.poll() is not None and seen >= len(sink):
                time.sleep(0.1)
                if seen >= len(sink):
                    break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s (rc={self.p.poll()})\n"
                             f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")

    def finish(self, timeout: float = 60.0) -> int:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"{self.argv} did not exit within {timeout} s\n"
                                 f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}") from None
        for t in self._threads:
            t.join(5)
        return rc

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def wait_until(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60.0,
        cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ if env is None else env)
    e.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run(argv, capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)
