"""The end of a ``spotckpt run``: what happens once the command has exited (or never
started). Process layer; a part of :class:`._supervisor.Supervisor`, kept apart because it
is its own job: wait for the writers the command left behind, hold back what may be torn,
flush within the deadline, report what is durable, choose the exit status.

Also :class:`Tap`, the events log that tallies what reached the remote for that report.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from spotckpt._commit import LocalDir, is_internal
from spotckpt._events import EventLog, log
from spotckpt._notices import EXIT_INTERRUPTED, EXIT_STALE, FLUSH_MARGIN
from spotckpt._sync import human_bytes

from . import _history, _proctree as pt

# Seconds kept back from the deadline for our own exit: the final flush ends then, as a
# Checkpointer's interruption flush does; the exit watchdog (_notices._exit) fires at 1 s.
_MARGIN = FLUSH_MARGIN
_WRITER_WAIT = 30.0          # without a notice: how long leftover writers get after the command exits


class Tap(EventLog):
    """The events log, plus a tally of what reached the remote (for the final report)."""

    def __init__(self, local: LocalDir) -> None:
        super().__init__(local.meta / "events.jsonl", role="supervisor")
        self.local, self.root = local, local.root
        self.last_upload: dict[str, Any] | None = None
        self.mirrored: dict[str, int] = {}

    def emit(self, event: str, **fields: Any) -> None:
        # Uploads also record when the uploaded state was made (manifest time, file mtime),
        # so the emulator can tell how much work an interruption lost.
        if event == "upload_done":
            try:
                fields["created"] = self.local.read_manifest(int(fields["step"])).created
            except Exception:  # noqa: BLE001 - informational only
                pass
            self.last_upload = fields
        elif event == "mirror_upload":
            try:
                fields["mtime"] = round((self.root / str(fields["path"])).stat().st_mtime, 3)
            except (OSError, KeyError):
                pass
            self.mirrored[str(fields.get("path"))] = int(fields.get("bytes") or 0)
        super().emit(event, **fields)


class Finish:
    """The supervisor's end of run (a mixin of :class:`._supervisor.Supervisor`)."""

    def _finish(self, rc: int | None) -> int:
        status = pt.exit_status(rc) if rc is not None else 0
        try:
            if rc is not None:
                self.events.emit("child_exit", status=status, killed=self.killed)
                log.info("spotckpt run: the command exited with status %d", status)
                self._wait_for_writers()
                self._hold_back(pt.writing_under(pt.descendants(), self.local.root),
                                "it is still being written by a process the command left behind")
            self._scan()
            if self.syncer is not None and self.syncer.stale is None:
                self._final_flush(rc)
            elif self.engine is not None:
                self.engine.retention()
        finally:
            pt.stop_descendants(timeout=self._seconds_left(default=2.0, cap=2.0))
            if self._child is not None:
                self._child.close()
            if self._wake is not None:
                self.gate.on_wait = None
                self._wake.close()
                self._wake = None
            self._restore_signals()
            self.local.unlock()
        if self.syncer is not None and self.syncer.stale is not None:
            self.syncer.close(timeout=0.0, join=0.0)
            sys.stderr.write(f"spotckpt.StaleGenerationError: {self.syncer.stale}\n")
            return EXIT_STALE
        if self.history is not None:  # how this incarnation ended, within what is left of the deadline
            self.history.end(_history.ending(rc=rc, notice=self.notice_at is not None, flushed=self.flushed,
                                             killed=self.killed),
                             timeout=self._seconds_left(default=5.0, cap=5.0))
        if rc is not None and status == 0 and self.notice_at is None and self.contract is not None:
            status = self._upload_artifacts()
        if self.notice_at is not None:
            # Interrupted, whatever the command returned: a command that exits 0 on SIGTERM
            # (Lightning does) did not complete, and an orchestrator must not read success.
            if status != EXIT_INTERRUPTED:
                log.warning("spotckpt run: exit status %d (interrupted by %s); the command's own "
                            "status was %s", EXIT_INTERRUPTED, self.notice_source,
                            "none (not started)" if rc is None else status)
            return EXIT_INTERRUPTED
        return status

    def _upload_artifacts(self) -> int:
        """SageMaker's Uploading: the job completed, /opt/ml/model goes up as model.tar.gz.
        Returns the exit status: 0, or 1 if the artifact could not be uploaded."""
        from spotckpt._sagemaker import upload_artifacts

        assert self.contract is not None
        try:
            upload_artifacts(self.contract, self.events)
        except Exception as e:  # noqa: BLE001 - one line, and the job is not Completed
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("spotckpt run: the model artifact was not uploaded: %s", line)
            self.events.emit("contract_error", message=f"model upload failed: {line}")
            return 1
        return 0

    def _wait_for_writers(self) -> None:
        """The command has exited: processes it left behind that are still writing into the
        local dir get the rest of the deadline (without a notice, up to ``_WRITER_WAIT`` s)
        to finish, so that the final flush uploads complete files. Waits until every process
        seen writing has exited; one that is merely alive (a stray ``sleep``) is not waited for."""
        seen: set[int] = set()
        t0, told = self.clock(), False
        while True:
            self._take_signals()  # a notice now shortens the wait
            procs = pt.descendants()
            seen |= {p.pid for p in procs if pt.writing_under([p], self.local.root)}
            waiting = [p for p in procs if p.pid in seen and pt.alive(p)]
            if not waiting:
                return
            end = t0 + _WRITER_WAIT if self.deadline is None else self._kill_at()
            if self.clock() >= end:
                log.warning("spotckpt run: %d process(es) the command left behind still write into %s; "
                            "stopping them", len(waiting), self.local.root)
                return
            if not told:
                told = True
                log.info("spotckpt run: waiting up to %.1f s for %d process(es) the command left behind, "
                         "still writing into %s", end - self.clock(), len(waiting), self.local.root)
                self.events.emit("waiting_for_writers", pids=[p.pid for p in waiting],
                                 seconds=round(end - self.clock(), 2))
            self._scan()
            pt.reap()
            time.sleep(self.poll)

    def _hold_back(self, paths: set[str], why: str) -> None:
        """Keep files (absolute paths) out of the final flush: the remote keeps its previous,
        complete copy rather than a torn one."""
        root = str(self.local.root.resolve()) + os.sep
        rels = {p[len(root):] for p in paths if p.startswith(root) and not is_internal(p[len(root):], self.local.root)}
        w = self.syncer.watcher if self.syncer is not None else None
        if rels and w is not None:
            w.hold.update(rels)
            w.beat()  # persisted: a later run on this dir does not upload them either
            log.warning("spotckpt run: not uploading %s: %s; the remote keeps its previous version",
                        ", ".join(sorted(rels)), why)

    def _ranks_step(self) -> str | None:
        """The newest checkpoint on the remote when the command's torch.distributed ranks
        upload their own parts (their part dirs are in the local dir), for the final line."""
        ranks = [d for d in self.local.root.glob("rank-*") if is_internal(d.name, self.local.root)]
        if not ranks or self.store is None:
            return None
        try:
            steps = self.store.committed()
        except Exception:  # noqa: BLE001 - a report line only
            return None
        return f"checkpoint step {steps[-1]} (uploaded by the command's {len(ranks)} ranks)" if steps else None

    def _flush_bound(self) -> float | None:
        """While the final flush waits: a signal that came meanwhile is a notice too (exit
        status 143), and the flush ends by its deadline."""
        self._take_signals()
        return None if self.deadline is None else self._seconds_left(default=0.0)

    def _seconds_left(self, *, default: float, cap: float | None = None) -> float:
        if self.deadline is None:
            return default
        left = max(0.0, self.deadline - self.clock() - _MARGIN)
        return min(left, cap) if cap is not None else left

    def _final_flush(self, rc: int | None) -> None:
        assert self.syncer is not None
        torn: set[str] = set()
        w = self.syncer.watcher
        if rc is None:
            self.gate.ended_with(True)  # never started: nothing of the command's to doubt
        elif rc != 0 and w is not None:
            # The command died while these were open for writing, or wrote them after our
            # last poll: they may be torn. Keep the previous remote copy rather than upload
            # a partial file, now and in a later run on this dir (the hold is persisted).
            torn = w.modified_since(self.gate.poll_wall_ns, self.gate.writers, self.gate.files)
        if torn and w is not None:
            w.hold.update(torn)
            w.beat()
            log.warning("spotckpt run: not uploading %s: it was being written when the command "
                        "died; the remote keeps its previous version", ", ".join(sorted(torn)))
        timeout = None if self.deadline is None else self._seconds_left(default=0.0)
        t0 = self.clock()
        self.events.emit("final_flush_start", seconds_left=None if self.deadline is None else round(timeout, 2))
        ok = self.syncer.flush(timeout, bound=self._flush_bound)
        if self.syncer.stale is not None:
            return  # a newer instance of the job took over: _finish says so
        self._scan()  # retention, now that uploads are done
        durable = self.syncer.durable_step
        step_bytes = None  # unknown once local retention removed it: not "0 B"
        if durable is not None and self.local.is_committed(durable):
            step_bytes = self.local.read_manifest(durable).total_bytes
        files = {k: v for k, v in self.events.mirrored.items() if k not in torn}
        size = f" ({human_bytes(step_bytes)})" if step_bytes is not None else ""
        what = (f"checkpoint step {durable}{size}" if durable is not None
                else self._ranks_step() or "no checkpoint")
        what += f", {len(files)} file(s) of the watched dir uploaded this run ({human_bytes(sum(files.values()))})"
        left = "" if self.deadline is None else f"; {max(0.0, self.deadline - self.clock()):.1f} s left before the deadline"
        newest = self.local.committed()[-1:] or [None]
        self.flushed = ok
        if ok:
            log.warning("spotckpt run: durable at %s: %s%s (final flush %.1f s)", self.cfg.remote, what,
                        left, self.clock() - t0)
        else:
            log.error("spotckpt run: NOT everything is durable at %s (%s): newest local step %s; "
                      "durable: %s%s", self.cfg.remote, self.syncer.last_error or "deadline reached",
                      newest[0], what, left)
        self.events.emit("final_flush", durable=ok, durable_step=durable, step_bytes=step_bytes,
                         files=len(files), file_bytes=sum(files.values()),
                         seconds_left=None if self.deadline is None else round(self.deadline - self.clock(), 2))
        self.syncer.close(timeout=min(1.0, self._seconds_left(default=1.0)))
