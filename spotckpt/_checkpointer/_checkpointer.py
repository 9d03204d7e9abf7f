"""The user API: :class:`Checkpointer`, a context manager around a training loop."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from spotckpt._cadence import resolve_schedule
from spotckpt._commit import LocalDir, _dircommit
from spotckpt._config import _UNSET, Config
from spotckpt._errors import StaleGenerationError
from spotckpt._events import log
from spotckpt._notices import (
    EXIT_INTERRUPTED,
    FlushPlanner,
    Interrupt,
    LifelineSource,
    MetadataWatcher,
    Notice,
    NoticeBoard,
    SignalSource,
    _exit,
)
from spotckpt._state import BATCHES_KEY as _BATCHES_KEY, Batches, Registry, _snapshot as _state
from spotckpt._sync import BackgroundWriter, Engine, Syncer

from . import _distributed, _lineage
from ._autosave import AutoSave
from ._shutdown import Shutdown
from ._startup import Startup

__all__ = ["Checkpointer", "EXIT_INTERRUPTED"]


class Checkpointer(Startup, Shutdown, AutoSave, Interrupt):
    """Checkpoint a training loop locally and to a remote; resume it after an interruption.

    Args:
        state: name -> object. Objects with ``state_dict``/``load_state_dict`` (modules,
            optimizers, schedulers, GradScaler, your own) are saved and loaded through them;
            other values (ints, lists, tensors) are saved as they are and, on restore,
            replaced in this dict. Python, numpy and torch RNG states are always included.
            ``None``: the framework writes its checkpoints itself, as directories committed
            with :meth:`commit_dir`; restore sets :attr:`restored_path`.
        local_dir: where checkpoints are committed (``SPOTCKPT_LOCAL_DIR``,
            default ``/opt/ml/checkpoints``).
        remote: fsspec URL to sync to (``SPOTCKPT_REMOTE``); ``None`` for local only.
        every_steps, every_seconds: periodic save cadence (either, both or neither).
        every: ``"auto"`` (or ``SPOTCKPT_EVERY=auto``): the interval chosen from the measured
            cost of a checkpoint and the job's own interruption history (Young/Daly,
            ``docs/concepts.md`` "Choosing the interval"); not with ``every_steps`` or
            ``every_seconds``.
        failure_rate, mtbf: ``every="auto"``'s prior for failures without a usable warning:
            per hour of training, or hours between them (one of the two; default one per
            2 h, weighted as a quarter of a failure; also the rate of a new regime when the
            record says the rate changed). The job's own record soon outweighs it.
        min_interval, max_interval: ``every="auto"``'s bounds in seconds (default 60, 7200).
        keep_last: committed checkpoints kept locally and remotely (default 2).
        grace_seconds: time from a notice to the deadline (default 30; 120 on SageMaker).
        exit_on_interrupt: leave the ``with`` block by ``SystemExit(143)`` after an
            interruption save (set False to handle it yourself via :attr:`interrupted`).
            Uncaught, it ends the process with ``os._exit(143)`` once ``atexit`` handlers
            ran, and a watchdog ends it 1 s before the deadline in any case (``_notices/_exit.py``).
        name: this Checkpointer's own lineage, for several in one job (model and EMA,
            generator and discriminator): checkpoints go to ``<local_dir>/ckpt-<name>/`` and
            ``<remote>ckpt-<name>/``. Default: none (``<local_dir>/``, ``<remote>``).

    Example:
        >>> with Checkpointer({"model": model, "optim": opt}, every_steps=500) as ckpt:  # doctest: +SKIP
        ...     for step in ckpt.steps(total=10_000):
        ...         train_one_step(step)

    Raises:
        ConfigError: at construction, for a bad cadence (``every`` other than ``"auto"``,
            ``every="auto"`` with ``every_steps``/``every_seconds``, a negative rate,
            ``min_interval`` > ``max_interval``), one line naming the setting.
        ConfigError, LocalDirError, RemoteError: on entry, for a bad setting, before any
            training step runs.
        CheckpointLockedError: on entry, when another Checkpointer of this process writes
            the same remote and name (or another process uses the local dir).
        ConfigError: at a step boundary or save, for a step out of ``0..10**12-1`` or below
            the lineage's newest step (steps only grow).
    """

    def __init__(self, state: dict[str, Any] | None, *, local_dir: str | os.PathLike[str] | None = None,
                 remote: str | None = _UNSET, every_steps: int | None = None,
                 every_seconds: float | None = None, keep_last: int | None = None,
                 grace_seconds: float | None = None, signals: tuple[int | str, ...] | None = None,
                 storage_options: Mapping[str, Any] | None = None, exit_on_interrupt: bool = True,
                 framework: str = "torch", clock: Callable[[], float] = time.monotonic,
                 name: str | None = None, every: str | None = None, failure_rate: float | None = None,
                 mtbf: float | None = None, min_interval: float | None = None,
                 max_interval: float | None = None) -> None:
        cadence = dict(every=every, failure_rate=failure_rate, mtbf=mtbf, min_interval=min_interval,
                       max_interval=max_interval, every_steps=every_steps, every_seconds=every_seconds)
        resolve_schedule(**cadence)  # a bad cadence fails here, where it is written
        self.state = state
        self._args = dict(local_dir=local_dir, remote=remote, keep_last=keep_last,
                          grace_seconds=grace_seconds, signals=signals,
                          storage_options=storage_options, name=name, **cadence)
        self.exit_on_interrupt = exit_on_interrupt
        self.framework = framework
        self.clock = clock
        self.step = 0
        self.restored_step: int | None = None
        self.restored_path: Path | None = None  # the restored directory (state=None)
        self.generation: int | None = None  # of this job on the remote (_remote/_fence.py)
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
        self._codec: Any = None  # _state.PlainCodec, or _dcp.ShardedCodec for a sharded state
        self._batches = Registry()  # the data positions of batches(), saved with the state
        self._open = False
        self._closing_error = False
        self.save_seconds: float | None = None  # duration of the last background write

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, StaleGenerationError):  # a newer instance of the job took over: leave with 3
            self._leave_stale(exc)
        if exc_type is not None and not issubclass(exc_type, (GeneratorExit, StopIteration)):
            # The loop failed: keep what is committed, flush briefly, and let the error out.
            self._closing_error = True
            self.close(timeout=min(self.config.grace_seconds if self.config else 30.0, 30.0), raise_errors=False)
            return
        # Leaving by SystemExit(143) if a notice came by the end of close() (after the last step
        # boundary, or during close's flush: _shutdown.py); further signals must not change that
        self._leaving = self.exit_on_interrupt
        self._close_or_leave()  # (exit 3 if a newer instance of the job took over)
        if self.interrupted and self.exit_on_interrupt:
            # uncaught: os._exit at once, not after a teardown that load stretches (_notices/_exit.py)
            raise _exit.Leaving(EXIT_INTERRUPTED) if _exit.armed() else SystemExit(EXIT_INTERRUPTED)

    def close(self, timeout: float | None = None, *, raise_errors: bool = True) -> None:
        """Finish background writes and uploads, restore signal handlers, release the dir.

        Raises:
            RemoteError: the last checkpoint could not be made durable (``raise_errors``).
        """
        was_open = self._open
        try:
            self._close(timeout, raise_errors=raise_errors)
        finally:
            if was_open:  # every="auto": how this incarnation ended, in the job's history
                self._auto_finish(error=self._closing_error)

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
        (``spotckpt/_state/_batches.py``). A ``StatefulDataLoader`` keeps its own position.

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
        self.step = _lineage.check_step(self.step, self._last_saved)
        self._check_stale()
        self._tick_in()
        try:
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
        finally:
            self._tick_out()

    def poll(self) -> tuple[bool, bool]:
        """At a step boundary of a framework that writes its own checkpoints (``self.step``
        advanced): ``(stop, save)``, whether a notice arrived and whether the cadence (or a
        rebalance advisory) wants a save, agreed by all ranks. Have the framework write its
        checkpoint, :meth:`commit_dir` it, and after a stop call :meth:`boundary`, which makes
        it durable within the deadline."""
        self._tick_in()
        try:
            stop, due, advisories = self._flags()
        finally:
            self._tick_out()
        if advisories and not stop:
            self.events.emit("advisory", source=",".join(advisories), step=self.step)
        return stop, due or bool(advisories)

    def commit_dir(self, path: str | os.PathLike[str], step: int | None = None, *,
                   only: Callable[[str], bool] | None = None) -> None:
        """Commit the directory ``path`` a framework wrote (a Transformers ``checkpoint-N/``)
        as checkpoint ``step`` (default :attr:`step`): one unit, same manifest, verification,
        upload and retention as :meth:`save`. Only hard links are made in this thread (a copy
        across filesystems): the framework may delete its directory at once. The restore of
        such a step sets :attr:`restored_path` (``state=None``). ``only``: which files
        (relative ``/``-separated paths) this process commits, e.g. one rank's part.
        """
        self._require_open()
        assert self._writer is not None and self._engine is not None and self._local is not None
        self._writer.wait()
        step = self.step if step is None else step
        if self._last_saved == step and self._local.is_committed(step):
            return
        c0, t0 = self.clock(), time.monotonic()
        staged = _dircommit.stage(self._local, Path(path), step, only)
        snapshot_s = time.monotonic() - t0
        self._last_saved = step
        self._policy.saved(step)

        def job() -> None:
            t1 = time.monotonic()
            try:
                self._engine.commit(step, lambda tmp, ready: _dircommit.move_into(staged, tmp),
                                    framework=self.framework, serializer=_dircommit.DIR)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            self.save_seconds = time.monotonic() - t1
            nbytes = self._local.read_manifest(step).total_bytes if self._local.is_committed(step) else 0
            self._planner.record_save(snapshot_s, self.save_seconds, nbytes)
            self.events.emit("saved", step=step, bytes=nbytes, snapshot_s=round(snapshot_s, 4),
                             write_s=round(self.save_seconds, 4), dir=str(path))
            self._auto_durable(step, local_commit=True, nbytes=nbytes)

        self._writer.submit(job)
        self._auto_saved(c0, step)

    def save(self, *, blocking: bool = False) -> None:
        """Snapshot the state now (CPU copy in this thread); write and upload in the background.

        Args:
            blocking: also wait for the local commit.
        """
        self._require_open()
        if self.state is None:
            raise RuntimeError("spotckpt: this Checkpointer commits directories (state=None): use commit_dir()")
        assert self._writer is not None and self._engine is not None
        step = self.step = _lineage.check_step(self.step, self._last_saved)  # before any work
        self._check_stale()
        c0 = self.clock()  # the stall starts here (every="auto" measures it)
        self._writer.wait()  # at most one snapshot in memory
        if self._last_saved == step and (self._local.is_committed(step) or step == self.restored_step):
            return  # (a step resharded from another world size is committed on the remote only)
        t0 = time.monotonic()
        if self._batches.live:  # the data positions of batches(), saved with the state
            self.state[_BATCHES_KEY] = self._batches
        try:
            payload = self._codec.snapshot(self._pool)  # buffers reused: a memcpy
        finally:
            self.state.pop(_BATCHES_KEY, None)
        snapshot_s = time.monotonic() - t0
        payload_step = step
        serializer = self._codec.serializer
        self._last_saved = step
        self._policy.saved(step)

        def job() -> None:
            t1 = time.monotonic()
            nbytes = 0

            def write(tmp: Path, ready: Callable[[str, int], None]) -> list:
                nonlocal nbytes
                entries = self._codec.write(tmp, payload, serializer, ready=ready)
                nbytes = sum(e.size for e in entries)
                return entries

            self._engine.commit(payload_step, write, framework=self.framework, serializer=serializer,
                                stream=self._codec.stream(serializer))  # uploaded while written
            self.save_seconds = time.monotonic() - t1
            self._planner.record_save(snapshot_s, self.save_seconds, nbytes)
            est = self._planner.estimate()
            self.events.emit("saved", step=payload_step, bytes=nbytes, snapshot_s=round(snapshot_s, 4),
                             write_s=round(self.save_seconds, 4),
                             flush_estimate_s=None if est is None else round(est, 3))
            self._auto_durable(step, local_commit=True, nbytes=nbytes)

        self._writer.submit(job)
        self._auto_saved(c0, step)
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
