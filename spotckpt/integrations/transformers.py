"""Hugging Face Transformers: one callback makes ``Trainer.train`` survive spot interruptions.

    from spotckpt.integrations.transformers import SpotCheckpoint

    spot = SpotCheckpoint(every_n_steps=500)              # or None: on Trainer's own saves
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[spot])
    trainer.train(resume_from_checkpoint=spot.resume_path())   # None on a fresh start

What it does:

- Trainer's checkpoint is a directory (``checkpoint-N/``: model, optimizer, scheduler, grad
  scaler, one RNG file per rank, ``trainer_state.json`` with the log history, best metric
  and the state of stateful callbacks such as ``EarlyStoppingCallback``). The callback has
  Trainer write it (``control.should_save``) every ``every_n_steps`` optimizer steps and/or
  ``every_seconds``, or, with neither, commits every save Trainer makes on its own
  (``save_strategy``); and always at the last step. Each one is committed whole as spotckpt
  step N (:meth:`spotckpt.Checkpointer.commit_dir`: hard links, manifest written last,
  uploaded to the remote, retention).
- On an interruption notice (SIGTERM, or any source the core watches) Trainer writes its
  checkpoint at the end of the current optimizer step, the callback commits it and makes it
  durable before the deadline, training stops and the process exits with status 143
  (``exit_on_interrupt=False``: ``train`` returns and :attr:`interrupted` is True).
- At ``Trainer(...)`` (``on_init_end``) it restores the newest checkpoint, locally or from
  the remote (an empty local dir on a new machine is the normal case), verified;
  :meth:`resume_path` is that directory for ``train(resume_from_checkpoint=...)``. Trainer
  resolves that argument before any callback runs, hence the one line. Trainer then
  restores everything itself, and its data position from the global step (it skips the
  batches already trained of the current epoch). Training with a checkpoint present but not
  passed is refused at ``on_train_begin``. ``restore_callback_states_from_checkpoint`` is
  turned on, so that early stopping continues where it was.

The watched dir: Trainer's ``output_dir`` must be outside spotckpt's ``local_dir`` (refused
otherwise): ``checkpoint-N/`` dirs in the watched dir would be uploaded a second time as the
script's own files. The callback's commits live in ``step-N/`` in the local dir, which the
watcher never mirrors; Trainer's ``save_total_limit`` rotates its own dir, spotckpt's
``keep_last`` the committed steps.

Multi-process (``accelerate launch``/``torchrun``, one host): each rank commits its part of
the step, rank 0 everything but the other ranks' RNG files, rank R its ``rng_state_R.pth``;
on restore each rank gets a directory with the shared files and its own RNG file. Ranks on
several hosts are not supported (rank 0's files are read from this host's local dir).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from spotckpt import Checkpointer
from spotckpt._commit import rank_dirname
from spotckpt._errors import ConfigError
from spotckpt._events import log

from ._common import UNSET, checkpointer_options, interrupted_exit, require, schedule_options

__all__ = ["SpotCheckpoint"]

_RANK_RNG = re.compile(r"^rng_state_(\d+)\.pth$")
_RESUME_DIR = "transformers-resume"  # per-rank resume dir, in the state dir (outside the local dir)


@functools.lru_cache(maxsize=None)
def _implementation() -> type:
    callback = require("transformers", "transformers", "transformers").TrainerCallback

    class _SpotCheckpoint(SpotCheckpoint, callback):
        pass

    _SpotCheckpoint.__name__ = _SpotCheckpoint.__qualname__ = "SpotCheckpoint"
    return _SpotCheckpoint


class SpotCheckpoint:
    """Transformers ``TrainerCallback``: periodic and notice-triggered saves, exact resume.

    Args:
        every_n_steps: have Trainer save every N optimizer steps (``state.global_step``).
        every_seconds: have Trainer save every S seconds. With neither, the saves Trainer
            makes by its ``save_strategy`` are committed (plus interruptions and the end).
        local_dir, remote, keep_last, grace_seconds, signals, storage_options: as for
            :class:`spotckpt.Checkpointer` (and their ``SPOTCKPT_*`` variables).
        every: ``"auto"``: the interval chosen from the measured cost of a checkpoint and
            the job's interruption history, as for :class:`spotckpt.Checkpointer` (not with
            ``every_n_steps`` or ``every_seconds``); ``failure_rate``, ``mtbf``,
            ``min_interval``, ``max_interval``: its settings.
        exit_on_interrupt: after an interruption save, end the process with status 143 when
            ``train`` ends. With False, ``train`` returns and :attr:`interrupted` is True.

    Example:
        >>> spot = SpotCheckpoint(every_n_steps=500)  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[spot])
        >>> trainer.train(resume_from_checkpoint=spot.resume_path())

    Raises:
        spotckpt.MissingDependencyError: transformers is not installed.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SpotCheckpoint:
        # The real class subclasses transformers.TrainerCallback, built on first use so that
        # importing this module imports no framework.
        if cls is SpotCheckpoint:
            cls = _implementation()
        return object.__new__(cls)

    def __init__(self, every_n_steps: int | None = None, every_seconds: float | None = None, *,
                 local_dir: str | os.PathLike[str] | None = None, remote: str | None = UNSET,
                 keep_last: int | None = None, grace_seconds: float | None = None,
                 signals: tuple[int | str, ...] | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 exit_on_interrupt: bool = True, every: str | None = None,
                 failure_rate: float | None = None, mtbf: float | None = None,
                 min_interval: float | None = None, max_interval: float | None = None) -> None:
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self.exit_on_interrupt = exit_on_interrupt
        self._options = checkpointer_options(local_dir=local_dir, remote=remote, keep_last=keep_last,
                                             grace_seconds=grace_seconds, signals=signals,
                                             storage_options=storage_options)
        self._options.update(schedule_options(  # every="auto": a bad setting fails here
            every=every, failure_rate=failure_rate, mtbf=mtbf, min_interval=min_interval,
            max_interval=max_interval, every_steps=every_n_steps, every_seconds=every_seconds,
            steps_name="every_n_steps"))
        self.checkpointer: Checkpointer | None = None
        self.interrupted = False
        self._resume: Path | None = None
        self._stopping = False
        self._rank, self._world = 0, 1

    # -- resume ------------------------------------------------------------------------------
    def resume_path(self) -> str | None:
        """The restored checkpoint's directory for ``trainer.train(resume_from_checkpoint=...)``,
        or None when there is nothing to resume (a first run). Valid after ``Trainer(...)``."""
        if self.checkpointer is None:
            raise RuntimeError("spotckpt: pass the callback to Trainer(callbacks=[...]) before resume_path()")
        return str(self._resume) if self._resume is not None else None

    def _open(self, args: Any) -> None:
        if self.checkpointer is not None:
            return
        ckpt = Checkpointer(None, every_steps=self.every_n_steps, every_seconds=self.every_seconds,
                            exit_on_interrupt=False, framework="transformers", **self._options)
        ckpt.open()
        self.checkpointer = ckpt
        d = ckpt._dist
        self._rank, self._world = (0, 1) if d is None else (d.rank, d.world_size)
        try:
            _check_output_dir(Path(args.output_dir), ckpt.local_dir)
            self._resume = self._resume_dir(ckpt)
        except BaseException:
            self._close(raise_errors=False)
            raise
        if self._resume is not None:
            log.warning("spotckpt: resuming Trainer from step %d (%s)", ckpt.restored_step, self._resume)

    def _resume_dir(self, ckpt: Checkpointer) -> Path | None:
        path = ckpt.restored_path
        if path is None or self._rank == 0:
            return path
        # Rank R's part holds its RNG file only; Trainer reads the rest from rank 0's part.
        shared = ckpt.local_dir / rank_dirname(0) / path.name
        if not shared.is_dir():
            raise ConfigError(f"spotckpt: rank {self._rank} cannot find rank 0's part of step "
                              f"{ckpt.restored_step} at {shared}: a Trainer job resumes on one host")
        assert ckpt._local is not None
        out = ckpt._local.scratch(_RESUME_DIR)
        for src in (shared, path):
            for f in src.iterdir():
                if f.is_file() and f.name != "MANIFEST.json" and not f.name.startswith("."):
                    if not (out / f.name).exists():
                        try:
                            os.link(f, out / f.name)
                        except OSError:
                            shutil.copyfile(f, out / f.name)
        return out

    # -- hooks -------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if args.save_only_model:
            log.warning("spotckpt: save_only_model=True: Trainer's checkpoints hold no optimizer, "
                        "scheduler or RNG state, so a resumed run is not exact")
        args.restore_callback_states_from_checkpoint = True  # early stopping continues exactly
        self._open(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._open(args)  # (a second train() after the first closed it)
        ckpt = self.checkpointer
        assert ckpt is not None
        self.interrupted = self._stopping = False
        if ckpt.restored_step is not None and state.global_step != ckpt.restored_step:
            self._close(raise_errors=False)
            raise ConfigError(
                f"spotckpt: a Trainer checkpoint at step {ckpt.restored_step} exists in {ckpt.local_dir} "
                f"(or the remote) but train() starts at step {state.global_step}; call "
                "trainer.train(resume_from_checkpoint=<callback>.resume_path())")
        ckpt.step = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = self.checkpointer
        if ckpt is None or self._stopping:
            return
        ckpt.step = state.global_step
        stop, due = ckpt.poll()
        if stop:
            self._stopping = True
            control.should_training_stop = True
        if stop or due or state.global_step >= state.max_steps:
            control.should_save = True
        self._unshare(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._stopping:
            control.should_save = False  # committed at the step end: no second write
        self._unshare(args, state, control)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        step = ckpt.step = state.global_step
        path = Path(args.output_dir) / f"checkpoint-{step}"
        if d := ckpt._dist:  # every rank's RNG file is written before any part is committed
            d.agree_max([0], where=f"Trainer checkpoint-{step}")
        if not path.is_dir():
            log.warning("spotckpt: Trainer saved step %d but %s is not there; not committed", step, path)
        else:
            ckpt.commit_dir(path, step, only=self._mine)
        if self._stopping:
            ckpt.boundary()  # the interruption flush: durable within the deadline
            self.interrupted = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if not self._stopping:
            ckpt.step = state.global_step
            stop, _ = ckpt.poll()  # a notice that came after the last step's save
            if stop:
                ckpt.boundary()
                self.interrupted = True
        self._close(raise_errors=True)
        if self.interrupted and self.exit_on_interrupt:
            raise interrupted_exit(ckpt)  # gone by the deadline, whatever the load

    # -- helpers -----------------------------------------------------------------------------
    def _mine(self, rel: str) -> bool:
        """The files of checkpoint-N that this rank commits."""
        if self._world == 1:
            return True
        m = _RANK_RNG.match(rel)
        return int(m.group(1)) == self._rank if m else self._rank == 0

    def _unshare(self, args: Any, state: Any, control: Any) -> None:
        """Trainer is about to write checkpoint-N again at a step already committed: its files
        are hard links of the committed ones, and Trainer truncates files it rewrites. Remove
        its copy first, so the second write makes new files."""
        ckpt = self.checkpointer
        if ckpt is None or not control.should_save or ckpt._last_saved != state.global_step:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for f in list(path.rglob("*")) if path.is_dir() else ():
            if not f.is_dir() and self._mine(f.relative_to(path).as_posix()):  # (each rank its own)
                f.unlink(missing_ok=True)

    def _close(self, *, raise_errors: bool) -> None:
        ckpt, self.checkpointer = self.checkpointer, None
        self._stopping = False
        if ckpt is None:
            return
        try:
            ckpt.close(raise_errors=raise_errors)
        finally:
            self.interrupted = self.interrupted or ckpt.interrupted


def _check_output_dir(output_dir: Path, local_dir: Path) -> None:
    out, local = os.path.realpath(output_dir), os.path.realpath(local_dir)
    if out == local or out.startswith(local.rstrip("/") + "/"):
        raise ConfigError(
            f"spotckpt: Trainer's output_dir '{output_dir}' is inside spotckpt's local_dir '{local_dir}': "
            "its checkpoint-N/ dirs would be uploaded twice (as committed steps and as the watched "
            "dir's files). Set output_dir outside it, e.g. /opt/ml/output/trainer")
