"""A one-slot background worker: the training thread hands over a snapshot and goes on."""
from __future__ import annotations

import threading
from typing import Callable


class BackgroundWriter:
    """Runs one job at a time in a thread; ``submit`` waits only while a job is queued.

    A failed job's exception is raised in the training thread at the next ``submit`` or
    ``wait``, so a full disk stops training instead of passing silently.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._job: Callable[[], None] | None = None
        self._running = False
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="spotckpt-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._cv:
            while self._job is not None and self._thread.is_alive():
                self._cv.wait()
            self._raise()
            self._job = job
            self._cv.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until idle; re-raise a failed job's error. False on timeout."""
        with self._cv:
            ok = self._cv.wait_for(lambda: self._job is None and not self._running, timeout)
            self._raise()
            return ok

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._job is not None or self._stop)
                if self._job is None:
                    return
                job = self._job
                self._running = True
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                with self._cv:
                    self._error = e
            finally:
                with self._cv:
                    self._job = None
                    self._running = False
                    self._cv.notify_all()
