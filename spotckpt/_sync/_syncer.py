"""The background Syncer: uploads committed checkpoints and runs the watched-dir mirror.

Sync layer: fsspec and the commit protocol's file order only, no ML imports.

- A bounded queue of one: the newest committed checkpoint wins; one superseded before its
  upload starts is skipped (and may then be deleted by local retention).
- Payload files first, each confirmed by size, then ``MANIFEST.json``: a remote manifest
  always names files that are there. Remote retention runs only after a newer commit is
  durable, and deletes manifests before payload.
- The watched dir (files the script writes itself) is mirrored by a :class:`spotckpt._watch._watcher.Watcher`
  as committed file sets; a pending step checkpoint preempts a mirror pass.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from spotckpt._commit import MANIFEST, LocalDir, Manifest, parse_step_dirname, step_dirname
from spotckpt._errors import CorruptCheckpointError, RemoteError, StaleGenerationError
from spotckpt._events import EventLog, log
from spotckpt._remote import Fence, Recorder, RemoteStore, generation_of, payload_dir
from spotckpt._watch import DirRule, Watcher, WriterGate, rules_from_env

from ._layout import SingleLayout, upload_dir

_IDLE_CPU = 0.005          # share of a core an idle Syncer may spend scanning the local dir


class Syncer:
    """Local dir -> remote, in a background thread.

    Example:
        >>> s = Syncer(LocalDir(root), RemoteStore(url), keep_last=2); s.start()  # doctest: +SKIP
        >>> s.submit(100); s.flush(timeout=30); s.close()
    """

    def __init__(self, local: LocalDir, store: RemoteStore, *, keep_last: int,
                 events: EventLog | None = None, mirror: bool = True,
                 scan_interval: float = 2.0, gate: WriterGate | None = None,
                 rules: tuple[DirRule, ...] | None = None, fence: Fence | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.local, self.store, self.keep_last = local, store, keep_last
        self.events = events or EventLog(None)
        self.mirror, self.scan_interval = mirror, scan_interval
        self.clock = clock
        self._cv = threading.Condition()
        self._pending: int | None = None
        # Manifests handed over before their local commit, with the temp paths of their
        # streamed files (see submit()); and the last step committed remotely that way.
        self._early: tuple[int, Manifest, dict[str, Path]] | None = None
        self._early_done: int | None = None
        self._retention_due: int | None = None  # a step whose remote retention did not complete
        self._uploading: int | None = None
        self._uploading_bytes = 0
        self._uploading_since: float | None = None
        self._force_scan = 0      # generation counter of requested full mirror passes
        self._scan_done = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.durable_step: int | None = None
        self.last_error: BaseException | None = None
        # Set when a newer generation of the job was claimed: nothing more is uploaded.
        self.stale: StaleGenerationError | None = None
        self.fence = fence
        self.bytes_uploaded = 0
        self.layout: SingleLayout = SingleLayout()  # RankLayout for one rank of many
        self.on_upload: Callable[[int, int, float], None] | None = None  # (step, bytes, seconds)
        self.history: Recorder | None = None  # one beat per durable checkpoint (every="auto", _remote/_history.py)
        self.upload_seconds = 0.0
        self._scan_cost = 0.0     # CPU seconds of the last idle mirror pass
        self._mirror_more = False  # the last pass yielded to a checkpoint: go on at once
        self._last_scan = float("-inf")
        # The watched dir: files the script writes itself, committed as file sets.
        self.watcher: Watcher | None = None
        if mirror:
            self.watcher = Watcher(local, store, events=self.events, gate=gate,
                                   rules=rules_from_env() if rules is None else rules,
                                   should_yield=lambda: self._pending is not None,
                                   interval=scan_interval)
        self.set_fence(fence)

    def set_fence(self, fence: Fence | None) -> None:
        """Write as generation ``fence.generation`` of the lineage (_remote/_fence.py); call after
        setting :attr:`layout`."""
        self.fence = self.layout.fence = fence
        self.layout.generation = fence.generation if fence is not None else 0
        if self.watcher is not None:
            self.watcher.fence = fence

    # -- public ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spotckpt-syncer", daemon=True)
        self._thread.start()

    def submit(self, step: int, *, manifest: Manifest | None = None,
               streamed: dict[str, Path] | None = None) -> None:
        """Queue committed checkpoint ``step`` for upload; an older queued one is skipped.

        With ``manifest`` (before the local commit): every file of it is being streamed from
        ``streamed[path]``; once the streams confirm those very files the remote manifest
        is written at once, in parallel with the local commit, which need not come first
        (bench/ row 6). If that cannot be done the step waits for its normal submit, which
        the caller makes after the local commit either way."""
        if manifest is not None and (streamed is None or type(self.layout) is not SingleLayout):
            return  # ranks commit through rank 0's combined manifest: the normal way only
        with self._cv:
            if manifest is not None and streamed is not None:
                self._early = (step, manifest, dict(streamed))
            if self._pending is not None and self._pending != step:
                skipped = min(self._pending, step)
                self.events.emit("upload_skipped", step=skipped, reason="superseded")
            self._pending = step if self._pending is None else max(self._pending, step)
            self._cv.notify_all()

    def in_flight(self) -> tuple[int, float]:
        """Bytes of the checkpoint being uploaded and seconds since its upload started
        (``(0, 0.0)`` when idle): the planner's view of the upload queue."""
        with self._cv:
            if self._uploading is None or self._uploading_since is None:
                # a big watched-dir file in flight: the next checkpoint upload waits for it
                up = self.watcher.uploading if self.watcher is not None else None
                return (0, 0.0) if up is None else (up[0], time.monotonic() - up[1])
            return self._uploading_bytes, time.monotonic() - self._uploading_since

    def uploading_step(self) -> int | None:
        with self._cv:
            return self._uploading

    def wait_durable(self, step: int, timeout: float | None = None) -> bool:
        """Wait until checkpoint ``step`` (or a newer one) is committed on the remote,
        without waiting for anything queued behind it. False on timeout."""
        end = None if timeout is None else self.clock() + max(0.0, timeout)
        with self._cv:
            while (self.durable_step is None or self.durable_step < step) and self._alive():
                left = None if end is None else end - self.clock()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.05 if left is None else min(0.05, left))
            return self.durable_step is not None and self.durable_step >= step

    def busy_steps(self) -> set[int]:
        """Steps that local retention must not delete (queued or uploading)."""
        with self._cv:
            return {s for s in (self._pending, self._uploading) if s is not None}

    def flush(self, timeout: float | None = None, *, mirror: bool = True,
              bound: Callable[[], float | None] | None = None) -> bool:
        """Wait until every submitted checkpoint (and, with ``mirror``, every watched-dir
        file not open for writing) is durable. Returns False on timeout or upload error.
        ``bound()``, asked while waiting: the seconds it may still take (a notice came), or None."""
        end = None if timeout is None else self.clock() + max(0.0, timeout)
        with self._cv:
            self.last_error = self.stale  # (sticky: a stale instance uploads nothing more)
            target = self._force_scan + 1 if (mirror and self.mirror) else self._scan_done
            if mirror and self.mirror:
                self._force_scan = target
            self._cv.notify_all()
            while True:
                idle = self._pending is None and self._uploading is None and self._scan_done >= target
                if idle or self.last_error is not None or not self._alive():
                    break
                if bound is not None and (cap := bound()) is not None:  # a notice: its deadline
                    end = min(float("inf") if end is None else end, self.clock() + max(0.0, cap))
                left = None if end is None else end - self.clock()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(0.05 if left is None else min(0.05, left))
            return self.last_error is None and self._pending is None

    def close(self, timeout: float | None = None, *, join: float | None = None,
              bound: Callable[[], float | None] | None = None) -> bool:
        """Flush (``bound``: as :meth:`flush`), stop the thread; whether everything is durable.
        ``join``: seconds to wait for the thread (5 s, 0.2 s after a failed flush; 0 to leave now)."""
        ok = self.flush(timeout, bound=bound)
        if self.watcher is not None:
            self.watcher.beat(clean=True)
        with self._cv:
            self._stop = True
            self._pending = None  # past the flush, nothing new starts
            self._cv.notify_all()
        if self._thread is not None:
            # An upload still running after a failed flush is abandoned: the thread is a
            # daemon, and without its manifest the partial upload does not exist.
            self._thread.join(timeout=join if join is not None else 5 if ok else 0.2)
        return ok

    # -- the thread ------------------------------------------------------------------------
    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cv:
                if (self._pending is None and self._force_scan == self._scan_done and not self._stop
                        and not self._mirror_more):
                    self._cv.wait(self._idle_interval())
                if self._stop and self._pending is None:
                    return
                step, self._pending = self._pending, None
                self._uploading = step
                scan_gen = self._force_scan
            try:
                if step is not None:
                    self._upload_checkpoint(step)
                force = scan_gen > self._scan_done
                if self.watcher is not None and (force or self._mirror_more or
                                                 time.monotonic() - self._last_scan >= self._idle_interval()):
                    self._mirror_pass(force=force)
            except StaleGenerationError as e:  # a newer instance of the job: stop for good
                self.stale = self.last_error = e
                self.events.emit("stale_generation", step=step, error=str(e))  # the owner says it
                with self._cv:
                    self._stop, self._pending = True, None
                return
            except Exception as e:  # noqa: BLE001 - recorded, surfaced by flush()/close()
                self.last_error = e
                self.events.emit("upload_failed", step=step, error=str(e))
                log.warning("%s", e)
                with self._cv:
                    if step is not None and self._pending is None:
                        self._pending = step  # try again later; nothing newer arrived
                    self._cv.notify_all()
                time.sleep(min(self.scan_interval, 1.0))
            finally:
                with self._cv:
                    self._uploading = None
                    self._uploading_since = None
                    if self.last_error is None and not self._mirror_more:
                        self._scan_done = max(self._scan_done, scan_gen)
                    self._cv.notify_all()

    def _upload_checkpoint(self, step: int) -> None:
        with self._cv:
            early, self._early = self._early, None
        if step == self._early_done:
            return  # committed remotely before its local commit (the normal submit follows)
        if early is not None and early[0] == step and self._commit_early(*early):
            return
        path = self.local.path(step)
        if not self.local.is_committed(step):
            return  # deleted or quarantined meanwhile
        manifest = self.local.read_manifest(step)
        lay = self.layout
        if self.store.exists(lay.marker_key(step)) and lay.marker_is_ours(self.store, step, manifest):
            lay.after_marker(self.store, step, manifest)
            self.durable_step = max(self.durable_step or -1, step)
            if lay.owns_retention and self._retention_due == step:
                self._remote_retention(step)  # an error cut it short: the retry of the step
            return
        t0 = self._started(step, manifest)
        for e in manifest.files:
            self.store.put_file(path / e.path, lay.payload_key(step, e.path))
        self._committed(step, manifest, t0)

    def _started(self, step: int, manifest: Manifest) -> float:
        t0 = time.monotonic()
        with self._cv:
            self._uploading_bytes, self._uploading_since = manifest.total_bytes, t0
        self.events.emit("upload_start", step=step, bytes=manifest.total_bytes)
        return t0

    def _commit_early(self, step: int, manifest: Manifest, streamed: dict[str, Path]) -> bool:
        """The remote commit of a step whose files were all streamed, before (or while) it
        is committed locally. False if a stream did not confirm its file: the step then
        goes the normal way after its local commit."""
        lay = self.layout  # a SingleLayout: submit() takes early hand-overs for nothing else
        if {e.path for e in manifest.files} != set(streamed):
            return False
        t0 = self._started(step, manifest)  # the upload's time includes waiting for the streams
        if not all(self.store.streams.take(lay.payload_key(step, e.path), streamed[e.path],
                                           self.local.path(step) / e.path, size=e.size)
                   for e in manifest.files):
            return False
        self._committed(step, manifest, t0)
        self._early_done = step
        return True

    def _committed(self, step: int, manifest: Manifest, t0: float) -> None:
        """Payload confirmed: write the marker, then account for the durable step."""
        lay = self.layout
        lay.write_marker(self.store, step, manifest)  # fenced: proves this generation is the newest
        lay.after_marker(self.store, step, manifest)  # rank 0 of many: the combined manifest
        dt = time.monotonic() - t0
        self.bytes_uploaded += manifest.total_bytes
        self.upload_seconds += dt
        with self._cv:
            self.durable_step = max(self.durable_step or -1, step)
            self._cv.notify_all()  # wait_durable() returns now, not after retention
        self.events.emit("upload_done", step=step, bytes=manifest.total_bytes, seconds=round(dt, 3))
        if self.on_upload is not None:
            self.on_upload(step, manifest.total_bytes, dt)
        if self.history is not None:
            self.history.beat()  # right after the commit whose check proved this generation newest
        if lay.owns_retention:
            self._remote_retention(step)

    def _remote_retention(self, newest: int) -> None:
        """Un-commit the checkpoints past ``keep_last`` (all manifests in one request), then
        delete every other payload older than the newest in one more: a few
        requests whatever the backlog, so a process killed again and again soon after
        each upload still catches up (one delete after another, it fell behind by one
        checkpoint per kill). Payload without a manifest there was left by a process killed
        between payload and manifest upload, or between these two requests: it never was a
        checkpoint, and nothing else would ever remove it. Quarantined checkpoints stay.

        Above the newest step, and beside the checkpoints kept, payload may be this
        process's upload in flight, but then it is under this generation's dir: another
        (older: the fence check proves no newer one) generation's payload there was left by
        a killed process that had run ahead of the remote, and can never be committed now
        (:meth:`_stale_payload`)."""
        self._retention_due = newest
        # A superseded step's stream may still be sending: done first, so that its payload
        # is in the listing (a late one stayed on the remote after a run's last upload).
        self.store.streams.drop_before(newest)
        by_step: dict[int, list[str]] = {}
        for rel in self.store.step_objects():
            s = parse_step_dirname(rel.split("/", 1)[0])
            if s is not None and "/" in rel:
                by_step.setdefault(s, []).append(rel)
        steps = sorted(s for s, rels in by_step.items() if f"{step_dirname(s)}/{MANIFEST}" in rels)
        keep = set(steps[-self.keep_last:]) | {newest}
        old = [s for s in steps if s not in keep and s < newest]
        doomed = {s: rels for s, rels in by_step.items() if s < newest and s not in keep
                  and f"{step_dirname(s)}/{MANIFEST}.quarantined" not in rels}
        stale = self._stale_payload(newest, {s: rels for s, rels in by_step.items() if s not in doomed})
        if self.fence is not None and (old or doomed or stale):
            self.fence.check("retention's deletes")  # never a newer generation's checkpoints
        self.store.rm_many([f"{step_dirname(s)}/{MANIFEST}" for s in old])
        for s in old:
            self.events.emit("remote_deleted", step=s)
        self.store.rm_many([rel for s, rels in doomed.items() for rel in rels
                            if not (s in old and rel.endswith(f"/{MANIFEST}"))]
                           + [rel for rels in stale.values() for rel in rels])
        for s in sorted((set(doomed) - set(old)) | set(stale)):
            self.events.emit("remote_orphan_deleted", step=s)
        self._retention_due = None

    def _stale_payload(self, newest: int, by_step: dict[int, list[str]]) -> dict[int, list[str]]:
        """Of the step dirs retention keeps (``step -> objects``), the objects of another
        generation's upload that no manifest names: everything but this generation's
        ``g-<G>/`` dir and the manifest, unless the manifest is another generation's (read
        only where the dir holds two uploads). Nothing while this instance writes where
        generations 0 and 1 did (``step-N/`` itself, which it cannot tell apart)."""
        g = self.layout.generation
        if self.fence is None or g <= 1:
            return {}
        out: dict[int, list[str]] = {}
        for s, rels in by_step.items():
            d = step_dirname(s)
            if f"{d}/{MANIFEST}.quarantined" in rels:
                continue
            mine = f"{payload_dir(s, g)}/"
            theirs = [r for r in rels if not r.startswith(mine) and r != f"{d}/{MANIFEST}"]
            if not theirs:
                continue
            if f"{d}/{MANIFEST}" in rels and s != newest:  # (newest: ours, just committed)
                if len({upload_dir(r) for r in rels if r != f"{d}/{MANIFEST}"}) < 2:
                    continue  # one upload: the manifest's (the usual case: no request)
                try:
                    named = payload_dir(s, generation_of(self.store.read_manifest(s)))
                except (CorruptCheckpointError, RemoteError):
                    continue  # unreadable or gone: not ours to judge here
                if named != d:
                    theirs = [r for r in theirs if not r.startswith(f"{named}/")]
                else:  # generations 0 and 1: right in step-N/, beside the others' g-<G>/ dirs
                    theirs = [r for r in theirs if upload_dir(r) != d]
            if theirs:
                out[s] = theirs
        return out

    # -- the watched dir ----------------------------------------------------------------------
    def _idle_interval(self) -> float:
        """Seconds between idle mirror passes: ``scan_interval``, stretched so that scanning
        a big tree costs at most ``_IDLE_CPU`` of a core (10,000 files: a ~30 ms pass every
        few seconds instead of every 2 s). A flush always runs a full pass at once."""
        return max(self.scan_interval, self._scan_cost / _IDLE_CPU)

    def _mirror_pass(self, *, force: bool) -> None:
        w = self.watcher
        assert w is not None
        n0, s0 = w.bytes_uploaded, w.upload_seconds
        try:
            w.settle = force  # a flush waits (<= 1 s) for a file emptied just before it
            self._mirror_more = not w.run_pass()
        finally:
            self._last_scan = time.monotonic()
            if not force:
                self._scan_cost = w.scan_cpu  # the scan's cost, not the uploads' (bench/ row 8)
            self.bytes_uploaded += w.bytes_uploaded - n0
            self.upload_seconds += w.upload_seconds - s0
