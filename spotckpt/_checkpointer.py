"""The user API: :class:`Checkpointer`, a context manager around a training loop."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import _distributed, _state
from ._batches import KEY as _BATCHES_KEY, Batches, Registry
from ._layout import RankLayout, rank_dirname
from ._config import _UNSET, Config, supervised
from ._engine import Engine, restore_newest
from ._errors import RemoteError
from ._events import EventLog, log
from ._local import LocalDir
from ._metadata import MetadataWatcher, sources_from_env
from ._notices import LifelineSource, Notice, NoticeBoard, SignalSource
from ._planner import PLAN_ACTIONS, FlushPlanner, finish_uploads
from ._policies import make_policy
from ._store import RemoteStore
from ._syncer import Syncer
from ._watch_pull import restore_files
from ._writer import BackgroundWriter

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what a container runtime reports for a SIGTERM exit
_FLUSH_MARGIN = 1.0     # seconds kept back from the deadline for process exit


class Checkpointer:
    """Checkpoint a training loop locally and to a remote; resume it after an interruption.

    Args:
        state: name -> object. Objects with ``state_dict``/``load_state_dict`` (modules,
            optimizers, schedulers, GradScaler, your own) are saved and loaded through them;
            other values (ints, lists, tensors) are saved as they are and, on restore,
            replaced in this dict. Python, numpy and torch RNG states are always included.
        local_dir: where checkpoints are committed (``SPOTCKPT_LOCAL_DIR``,
            default ``/opt/ml/checkpoints``).
        remote: fsspec URL to sync to (``SPOTCKPT_REMOTE``); ``None`` for local only.
        every_steps, every_seconds: periodic save cadence (either, both or neither).
        keep_last: committed checkpoints kept locally and remotely (default 2).
        grace_seconds: time from a notice to the deadline (default 30; 120 on SageMaker).
        exit_on_interrupt: leave the ``with`` block by ``SystemExit(143)`` after an
            interruption save (set False to handle it yourself via :attr:`interrupted`).

    Example:
        >>> with Checkpointer({"model": model, "optim": opt}, every_steps=500) as ckpt:  # doctest: +SKIP
        ...     for step in ckpt.steps(total=10_000):
        ...         train_one_step(step)

    Raises:
        ConfigError, LocalDirError, RemoteError: on entry, for a bad setting, before any
            training step runs.
    """

    def __init__(self, state: dict[str, Any], *, local_dir: str | os.PathLike[str] | None = None,
                 remote: str | None = _UNSET, every_steps: int | None = None,
                 every_seconds: float | None = None, keep_last: int | None = None,
                 grace_seconds: float | None = None, signals: tuple[int | str, ...] | None = None,
                 storage_options: Mapping[str, Any] | None = None, exit_on_interrupt: bool = True,
                 framework: str = "torch", clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self._args = dict(local_dir=local_dir, remote=remote, every_steps=every_steps,
                          every_seconds=every_seconds, keep_last=keep_last,
                          grace_seconds=grace_seconds, signals=signals,
                          storage_options=storage_options)
        self.exit_on_interrupt = exit_on_interrupt
        self.framework = framework
        self.clock = clock
        self.step = 0
        self.restored_step: int | None = None
        self.interrupted = False
        self.config: Config | None = None
        self._board = NoticeBoard(clock)
        self._signals: SignalSource | None = None
        self._lifeline: LifelineSource | None = None
        self._leaving = False
        self._watcher: MetadataWatcher | None = None
        self._dist: _distributed.Dist | None = None
        self._planner = FlushPlanner()
        self._syncer: Syncer | None = None
        self._writer: BackgroundWriter | None = None
        self._engine: Engine | None = None
        self._local: LocalDir | None = None
        self._last_saved: int | None = None
        self._pool = _state.SnapshotPool()  # CPU copy of the state, refilled each save
        self._batches = Registry()  # the data positions of batches(), saved with the state
        self._open = False
        self.save_seconds: float | None = None  # duration of the last background write

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        self.open()
        return self

    def open(self) -> None:
        """Validate settings, take the local dir, restore the newest checkpoint, start the
        background threads and the signal handlers."""
        cfg = self.config = Config.resolve(**self._args)
        d = self._dist = _distributed.detect()
        # one rank of many: its own part dir, so ranks sharing a host never collide
        local = LocalDir(cfg.local_dir)
        local = self._local = local if d is None else local.part(rank_dirname(d.rank))
        local.lock()
        try:
            # Notices first: a SIGTERM during the restore (a big download, a slow load) is
            # recorded, and the first step boundary then does the interruption save instead
            # of the process dying with a local-only checkpoint never uploaded.
            self._signals = SignalSource(self._board, cfg.signals, cfg.grace_seconds)
            self._signals.install()
            if supervised():
                self._lifeline = LifelineSource.from_env(self._board, cfg.grace_seconds)
                if self._lifeline is not None:
                    self._lifeline.start()
            local.clean_temp()
            events = self.events = EventLog(local.meta / "events.jsonl")
            store = None
            remote = cfg.remote
            if d is not None and not remote:  # ranks on one host commit through a shared dir
                remote = f"file://{cfg.local_dir}/shared/"
            if remote and not supervised():
                store = RemoteStore(remote, cfg.storage_options)
                store.probe()
            self._policy = make_policy(cfg.every_steps, cfg.every_seconds, self.clock)
            if d is None:
                found = restore_newest(local, store, events=events)
                if store is not None:
                    # the files the script writes itself come back too: the in-process
                    # watcher mirrors the dir as it is, deletes included (_watch.py)
                    restore_files(local, store, events=events)
            else:
                found = _distributed.restore(d, local, store, events=events)
            if found is not None:
                step, manifest, durable = found
                payload = _state.read_state(local.path(step), manifest.serializer)
                missing = _state.apply(self.state, payload)
                self._batches.load_state_dict(payload.get(_BATCHES_KEY) or {})
                if missing:
                    log.warning("spotckpt: checkpoint step %d has no entry for %s; left as is", step, missing)
                self.step = self.restored_step = self._last_saved = step
                log.info("spotckpt: resumed from step %d", step)
            if store is not None:
                self._syncer = Syncer(local, store, keep_last=cfg.keep_last, events=events,
                                      mirror=d is None)
                if d is not None:
                    self._syncer.layout = RankLayout(d.rank, d.world_size, wait_seconds=cfg.grace_seconds)
                self._syncer.start()
                if found is not None and not found[2]:
                    self._syncer.submit(found[0])
                elif found is not None:
                    self._syncer.durable_step = found[0]  # restored from a remote commit
            self._engine = Engine(local, syncer=self._syncer, keep_last=cfg.keep_last, events=events,
                                  local_retention=not supervised(),
                                  rank=0 if d is None else d.rank,
                                  world_size=1 if d is None else d.world_size)
            self._writer = BackgroundWriter()
            self._planner = FlushPlanner(uploads=store is not None)
            if self._syncer is not None:
                self._syncer.on_upload = self._after_upload
                self._engine.retention_after_upload = True
            self._watcher = MetadataWatcher(
                self._board, sources_from_env(), on_advise=self._board.advise,
                interval=float(os.environ.get("SPOTCKPT_METADATA_INTERVAL") or 5.0))
            self._watcher.start()
            self._open = True
        except BaseException:
            self._teardown()
            raise

    def _after_upload(self, step: int, nbytes: int, seconds: float) -> None:
        """Syncer thread: learn the upload rate; drop local checkpoints that were kept only
        because they were still uploading."""
        self._planner.record_upload(nbytes, seconds)
        if self._engine is not None:
            self._engine.retention()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, (GeneratorExit, StopIteration)):
            # The loop failed: keep what is committed, flush briefly, and let the error out.
            self.close(timeout=min(self.config.grace_seconds if self.config else 30.0, 30.0), raise_errors=False)
            return
        # Leaving by SystemExit(143): further notice signals must not change that (see
        # SignalSource.restore).
        self._leaving = self.interrupted and self.exit_on_interrupt
        self.close()
        if self.interrupted and self.exit_on_interrupt:
            raise SystemExit(EXIT_INTERRUPTED)

    def close(self, timeout: float | None = None, *, raise_errors: bool = True) -> None:
        """Finish background writes and uploads, restore signal handlers, release the dir.

        Raises:
            RemoteError: the last checkpoint could not be made durable (``raise_errors``).
        """
        if not self._open:
            return
        self._open = False
        err: BaseException | None = None
        try:
            if self.notice is not None and not self.interrupted:
                self._interrupt_save()  # a notice that came after the last step boundary
            if self._writer is not None:
                self._writer.wait()
            if self._syncer is not None:
                notice = self.notice
                if notice is not None:
                    timeout = max(0.0, notice.seconds_left(self.clock) - _FLUSH_MARGIN)
                if not self._syncer.close(timeout):
                    problem = self._syncer.last_error or RemoteError(
                        f"spotckpt: uploads to {self.config.remote} did not finish within {timeout:.0f} s")
                    if self.interrupted:
                        # Past the deadline the process must exit (143) now; what is durable
                        # was logged by the interruption flush.
                        log.error("%s", problem)
                    else:
                        err = problem
        except BaseException as e:  # noqa: BLE001
            err = e
        finally:
            self._teardown()
        if err is not None and raise_errors:
            raise err

    def _teardown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self._signals is not None:
            self._signals.restore(until_exit=self._leaving)
        if self._lifeline is not None:
            self._lifeline.stop()
            self._lifeline = None
        if self._writer is not None:
            self._writer.close()
        if self._local is not None:
            self._local.unlock()

    # -- the loop ----------------------------------------------------------------------------
    @property
    def notice(self) -> Notice | None:
        """The interruption notice, once one has arrived."""
        return self._board.notice

    @property
    def should_stop(self) -> bool:
        """True once an interruption notice arrived: save (done for you by :meth:`steps`)
        and leave the loop."""
        return self._board.notice is not None

    def steps(self, total: int) -> Iterator[int]:
        """Yield step indices ``self.step .. total-1``; ``self.step`` counts completed steps.

        After each step: on a notice, save, flush within the deadline and stop; otherwise
        save when the policy is due. At the end, a final save.
        """
        self._require_open()
        if self.step < total and self._flags(consume=False)[0]:
            self._interrupt_save()  # the notice came before the first step
            return
        while self.step < total:
            yield self.step
            self.step += 1
            self.boundary()
            if self.interrupted:
                return
        if self._flags(consume=False)[0]:
            self._interrupt_save()
        else:
            self.save()

    def batches(self, loader: Any, *, name: str = "train") -> Batches:
        """The batches of ``loader`` epoch after epoch (it never ends), resumed exactly: the
        shuffled order redrawn, the consumed batches skipped unloaded, the RNG untouched
        (``spotckpt/_batches.py``). A ``StatefulDataLoader`` keeps its own position.

        Example:
            >>> data = ckpt.batches(loader)  # doctest: +SKIP
            >>> for step in ckpt.steps(total=10_000):
            ...     x, y = next(data)
        """
        return self._batches.make(loader, name, self.state)

    def _flags(self, *, consume: bool = True) -> tuple[bool, bool, list[str]]:
        """(stop, periodic save due, advisories) at this boundary, agreed by all ranks."""
        stop = self.should_stop
        adv = self._board.take_advisories() if consume else []
        due = consume and self._policy.due(self.step)
        if self._dist is not None:
            s, a, du = self._dist.agree_max([stop, bool(adv), due], where=f"step {self.step}")
            stop, due = bool(s), bool(du)
            adv = adv or (["peer-rank-advisory"] if a else [])
        return stop, due, adv

    def boundary(self) -> None:
        """Call after each completed step if you drive the loop yourself (``self.step``
        already advanced): handles notices and periodic saves."""
        stop, due, advisories = self._flags()
        if stop:
            self._interrupt_save()
            return
        if advisories:
            self.events.emit("advisory", source=",".join(advisories), step=self.step)
            log.warning("spotckpt: %s: checkpointing early, training goes on", ", ".join(advisories))
            self.save()
        elif due:
            self.save()

    def save(self, *, blocking: bool = False) -> None:
        """Snapshot the state now (CPU copy in this thread); write and upload in the background.

        Args:
            blocking: also wait for the local commit.
        """
        self._require_open()
        assert self._writer is not None and self._engine is not None
        self._writer.wait()  # at most one snapshot in memory
        step = self.step
        if self._last_saved == step and self._local.is_committed(step):
            return
        t0 = time.monotonic()
        state = {**self.state, _BATCHES_KEY: self._batches} if self._batches.live else self.state
        payload = _state.snapshot(state, pool=self._pool)  # buffers reused: a memcpy
        snapshot_s = time.monotonic() - t0
        payload_step = step
        serializer = _state.serializer_name()
        self._last_saved = step
        self._policy.saved(step)

        def job() -> None:
            t1 = time.monotonic()
            nbytes = 0

            def write(tmp: Path, ready: Callable[[str, int], None]) -> list:
                nonlocal nbytes
                entries = _state.write_state(tmp, payload, serializer, ready=ready)
                nbytes = sum(e.size for e in entries)
                return entries

            self._engine.commit(payload_step, write, framework=self.framework, serializer=serializer,
                                stream=[_state.payload_name(serializer)])  # uploaded while written
            self.save_seconds = time.monotonic() - t1
            self._planner.record_save(snapshot_s, self.save_seconds, nbytes)
            est = self._planner.estimate()
            self.events.emit("saved", step=payload_step, bytes=nbytes, snapshot_s=round(snapshot_s, 4),
                             write_s=round(self.save_seconds, 4),
                             flush_estimate_s=None if est is None else round(est, 3))

        self._writer.submit(job)
        if blocking:
            self._writer.wait()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save so far is committed locally and durable on the remote.

        Returns:
            False if ``timeout`` passed or an upload failed (see :attr:`last_error`).
        """
        self._require_open()
        assert self._writer is not None
        t0 = time.monotonic()
        if not self._writer.wait(timeout):
            return False
        if self._syncer is None:
            return True
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
        return self._syncer.flush(left)

    def wait_durable(self, step: int | None = None, timeout: float | None = None) -> bool:
        """Wait until checkpoint ``step`` (default: the last one saved), or a newer one, is
        committed on the remote; lighter than :meth:`flush`, which also waits for the
        free-form files and retention. Without a remote: until it is committed locally.

        Returns:
            False if ``timeout`` passed first (an upload that keeps failing: see
            :attr:`last_error`).
        """
        self._require_open()
        assert self._writer is not None
        step = self._last_saved if step is None else step
        if step is None:
            return True
        if self._syncer is None:
            return self._writer.wait(timeout)
        return self._syncer.wait_durable(step, timeout)

    @property
    def last_error(self) -> BaseException | None:
        """The last upload error, if the remote is failing (uploads keep retrying)."""
        return self._syncer.last_error if self._syncer is not None else None

    def _interrupt_save(self) -> None:
        if self.interrupted:
            return
        if self.notice is None:  # another rank got the notice; the deadline is agreed below
            self._board.post("peer-rank", self.config.grace_seconds)
        notice = self.notice
        assert notice is not None
        self.interrupted = True
        t0 = self.clock()
        left = notice.seconds_left(self.clock)
        self.events.emit("notice", source=notice.source, step=self.step, seconds_left=round(left, 2))
        assert self._writer is not None
        self._writer.wait()  # a periodic save in flight counts as committed for the plan
        saved = self._last_saved == self.step
        undurable = self._syncer is not None and bool(self._syncer.busy_steps())
        plan = self._planner.decide(left, unsaved_work=not saved, undurable_commit=undurable,
                                    queued_s=self._planner.queued_seconds(self._syncer))
        if self._dist is not None:  # every rank follows the most careful plan, earliest deadline
            neg_left, code = self._dist.agree_max([-left, PLAN_ACTIONS.index(plan.action)],
                                                  where="the interruption plan")
            if -neg_left < left:
                left = -neg_left
                self._board.post_deadline(notice.source, self.clock() + left)
                notice = self.notice
            plan = dataclasses.replace(plan, action=PLAN_ACTIONS[int(code)], seconds_left=left)
        self.events.emit("plan", action=plan.action, estimate_s=plan.estimate,
                         seconds_left=round(left, 2), reason=plan.reason)
        log.warning("spotckpt: %s received at step %d, %.1f s left: %s", notice.source, self.step,
                    left, plan.reason)
        if plan.action == "save":
            self.save(blocking=True)
        ok = True
        if self._syncer is not None:
            budget = max(0.0, notice.seconds_left(self.clock) - _FLUSH_MARGIN)
            ok = finish_uploads(self._syncer, plan.action, budget, self.config.remote)
        self.events.emit("flush", action=plan.action, step=self.step, durable=ok,
                         durable_step=self.durable_step, estimate_s=plan.estimate,
                         actual_s=round(self.clock() - t0, 3),
                         seconds_left=round(notice.seconds_left(self.clock), 2))
        if self._dist is not None:  # leave together, so no rank is killed mid-flush
            self._dist.agree_max([0], where="exit after the interruption save")

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("spotckpt: use the Checkpointer inside `with` (or call open())")

    @property
    def durable_step(self) -> int | None:
        """Newest step known to be committed on the remote (None if none, or no remote)."""
        return self._syncer.durable_step if self._syncer is not None else None

    @property
    def local_dir(self) -> Path:
        assert self.config is not None
        return self.config.local_dir
