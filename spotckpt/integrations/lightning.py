"""PyTorch Lightning: one callback makes ``Trainer.fit`` survive spot interruptions.

    import lightning as L                      # or: import pytorch_lightning as L
    from spotckpt.integrations.lightning import SpotCheckpoint

    trainer = L.Trainer(max_epochs=10, callbacks=[SpotCheckpoint(every_n_steps=500)])
    trainer.fit(model, train_loader)           # resumes by itself; ckpt_path="last" works too

What it does:

- Periodic saves of Lightning's full training checkpoint (model, optimizers, LR schedulers,
  loops, callbacks, precision state, resumable dataloader state) plus the Python, numpy and
  torch RNG states, every ``every_n_steps`` optimizer steps and/or ``every_seconds``,
  through :class:`spotckpt.Checkpointer` (local commit, upload to the remote, retention).
- On an interruption notice (SIGTERM, or any source the core watches), it saves at the next
  optimizer-step boundary (never mid gradient accumulation), makes the save durable within
  the deadline, stops the trainer and, by default, ends the process with status 143.
- On the next ``fit`` it finds the newest checkpoint, locally or on the remote (an empty
  local dir on a new machine is the normal case), verifies it and resumes step-exactly. A
  first run with nothing to restore starts from scratch.

How the resume is wired: Lightning resolves ``fit(ckpt_path=None)`` to ``"last"`` when an
``OnExceptionCheckpoint`` is present and asks it for its ``ckpt_path``. The callback is one
(it never writes Lightning's on-exception file); its ``ckpt_path`` is the verified spotckpt
checkpoint, written back as a Lightning checkpoint file in a temp dir under the local dir.
So neither ``fit(model)`` nor ``fit(model, ckpt_path="last")`` needs a change, and passing
another explicit ``ckpt_path`` while a spotckpt checkpoint exists is refused.

What is exact: with ``torch.use_deterministic_algorithms``-grade settings (CPU, fixed threads)
the weights after an interrupted and resumed run are bitwise those of an uninterrupted one,
wherever the interruption falls: a train dataloader with ``state_dict``/``load_state_dict``
(torchdata's ``StatefulDataLoader``) restores its own position, and one plain shuffled
``DataLoader``, which Lightning cannot fast-forward, is resumed here (``_lightning_data.py``:
the RNG its epoch's order came from is saved, the same order redrawn, the batches done skipped
at the sampler). The RNG states are put back just before the first resumed batch.
Hyperparameters saved in checkpoints must be plain values (checkpoints load with
``weights_only=True``). Being a Lightning ``Checkpoint`` callback, it
needs ``enable_checkpointing=True`` (the default) and replaces the default
``ModelCheckpoint``; add one yourself if you also want Lightning's own ``.ckpt`` files.

Multi-process (DDP; Lightning launching the other ranks itself, or torchrun): Lightning reads
``ckpt_path`` before it creates the process group, so in a multi-process run the callback
opens the Checkpointer in ``setup`` instead, once the group exists, and hands the restored
checkpoint to Lightning in memory (``fit`` must then not load another checkpoint: an explicit
``ckpt_path``, or a ``ModelCheckpoint``'s last file for ``"last"``, is refused). Every rank
saves its own part (its model and optimizer copy, loops, dataloader state, RNG); a notice on
any rank stops every rank after the same batch. Lightning's own SIGTERM handling is bypassed
while the callback owns SIGTERM: it acts on rank 0's signal only and broadcasts from inside
the signal handler. The ranks Lightning's launcher started exit after the launching process,
whose watchdog would otherwise SIGKILL it when it sees a rank exit with status 143.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

from spotckpt import Checkpointer
from spotckpt._errors import ConfigError
from spotckpt._events import log
from spotckpt._notices import EXIT_INTERRUPTED
from spotckpt._state import _batches, _snapshot as _state

from ._common import UNSET, checkpointer_options, require, schedule_options
from ._lightning_data import data_position, plain_loader
from ._lightning_dist import (
    bypass_sigterm_notifier,
    exit_after_launcher,
    hand_to_lightning,
    multi_process,
    restore_sigterm_notifier,
)

__all__ = ["SpotCheckpoint"]

# A scratch dir in spotckpt's state dir (outside the watched local dir, which a script may
# read as "resume" when it is not empty); the core's clean_temp() removes it after a crash.
# Lightning takes any path for ckpt_path: it only loads the file.
_RESUME_DIR = "lightning-resume"


def _package() -> str:
    """``lightning.pytorch`` or ``pytorch_lightning``: the one the user's Trainer comes from.

    The two ship separate class hierarchies, and a Trainer accepts only callbacks of its own.
    """
    if "pytorch_lightning" in sys.modules and "lightning.pytorch" not in sys.modules:
        return "pytorch_lightning"
    try:
        require("lightning.pytorch", "lightning", "lightning")
        return "lightning.pytorch"
    except ImportError:
        require("pytorch_lightning", "lightning", "lightning")
        return "pytorch_lightning"


@functools.lru_cache(maxsize=None)
def _implementation(package: str) -> type:
    callbacks = require(f"{package}.callbacks", "lightning", "lightning")

    class _SpotCheckpoint(SpotCheckpoint, callbacks.OnExceptionCheckpoint):
        pass

    _SpotCheckpoint.__name__ = _SpotCheckpoint.__qualname__ = "SpotCheckpoint"
    return _SpotCheckpoint


class _TrainerState:
    """The Checkpointer's view of a trainer: Lightning's own full checkpoint plus RNG."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.restored: dict[str, Any] | None = None
        self.epoch_rng: dict[str, Any] | None = None  # the plain train loader's, at this epoch's iter()

    def state_dict(self) -> dict[str, Any]:
        # What Trainer.save_checkpoint writes, kept in memory so that the core writes it in
        # the background. The RNG is also kept here (not only in the core's copy) because it
        # must be put back later than the restore, just before the first resumed batch.
        ckpt = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        return {"checkpoint": ckpt, "rng": _state.rng_state(), "epoch_rng": self.epoch_rng}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.restored = dict(sd)


class SpotCheckpoint:
    """Lightning callback: periodic and notice-triggered saves, and exact resume.

    Args:
        every_n_steps: save every N optimizer steps (``trainer.global_step``).
        every_seconds: save every S seconds (either, both or neither; with neither, only
            interruptions and the end of training save).
        local_dir, remote, keep_last, grace_seconds, signals, storage_options: as for
            :class:`spotckpt.Checkpointer` (and their ``SPOTCKPT_*`` variables).
        every: ``"auto"``: the interval chosen from the measured cost of a checkpoint and
            the job's interruption history, as for :class:`spotckpt.Checkpointer` (not with
            ``every_n_steps`` or ``every_seconds``); ``failure_rate``, ``mtbf``,
            ``min_interval``, ``max_interval``: its settings.
        exit_on_interrupt: after an interruption save, end the process with status 143 once
            ``fit`` has cleaned up. With False, ``fit`` returns and :attr:`interrupted` is True.

    Example:
        >>> trainer = L.Trainer(callbacks=[SpotCheckpoint(every_n_steps=500)])  # doctest: +SKIP
        >>> trainer.fit(model, loader)

    Raises:
        spotckpt.MissingDependencyError: neither ``lightning`` nor ``pytorch_lightning`` is
            installed.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SpotCheckpoint:
        # Build the real class on first use, on the Lightning package the user imported:
        # importing this module imports no framework.
        if cls is SpotCheckpoint:
            cls = _implementation(_package())
        return object.__new__(cls)

    def __init__(self, every_n_steps: int | None = None, every_seconds: float | None = None, *,
                 local_dir: str | os.PathLike[str] | None = None, remote: str | None = UNSET,
                 keep_last: int | None = None, grace_seconds: float | None = None,
                 signals: tuple[int | str, ...] | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 exit_on_interrupt: bool = True, every: str | None = None,
                 failure_rate: float | None = None, mtbf: float | None = None,
                 min_interval: float | None = None, max_interval: float | None = None) -> None:
        super().__init__(dirpath=str(local_dir or "."), filename="spotckpt-resume")  # type: ignore[call-arg]
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
        self._state = _TrainerState()
        self._resume_file: Path | None = None
        self._grace_left = 0.0  # seconds to the deadline when the Checkpointer closed
        self.interrupted = False
        self._first_epoch = 0  # the epoch whose train iterator on_train_start made
        # Lightning's notes for OnExceptionCheckpoint users do not apply to this callback.
        for text in (r".*ckpt_path=None\)` was called without a model",
                     r'.*ckpt_path="last"\) is set, but there is no last checkpoint available'):
            warnings.filterwarnings("ignore", message=text)

    # -- the checkpoint Lightning loads ------------------------------------------------------
    @property
    def ckpt_path(self) -> str | None:  # type: ignore[override]
        """The newest verified checkpoint as a Lightning checkpoint file, or None.

        Lightning reads this while it resolves ``fit(ckpt_path=None | "last")``, before any
        hook runs, so this is where the Checkpointer opens and restores; except in a
        multi-process run, whose process group does not exist yet: None, and ``setup`` opens.
        """
        if multi_process():
            return None
        self._open()
        return str(self._resume_file) if self._resume_file is not None else None

    def _open(self, trainer: Any = None) -> Checkpointer:
        """Open the Checkpointer and restore. Without ``trainer`` (from :attr:`ckpt_path`), the
        restored checkpoint becomes a file for Lightning to load; with it (from ``setup``),
        Lightning gets it in memory."""
        if self.checkpointer is not None:
            return self.checkpointer
        self.interrupted = False
        self._state.restored = None
        self._state.epoch_rng = None
        ckpt = Checkpointer({"lightning": self._state}, every_steps=self.every_n_steps,
                            every_seconds=self.every_seconds, exit_on_interrupt=False,
                            framework="lightning", **self._options)
        ckpt.open()
        self.checkpointer = ckpt
        if self._state.restored is not None:
            if trainer is None:
                import torch

                assert ckpt._local is not None
                d = ckpt._local.scratch(_RESUME_DIR)
                self._resume_file = d / f"step-{ckpt.restored_step}.ckpt"
                torch.save(self._state.restored["checkpoint"], self._resume_file)
            else:
                hand_to_lightning(trainer, self._state.restored["checkpoint"])
            log.warning("spotckpt: resuming Lightning from step %d", ckpt.restored_step)
        return ckpt

    def _drop_resume_file(self) -> None:
        if self._resume_file is not None:
            shutil.rmtree(self._resume_file.parent, ignore_errors=True)
            self._resume_file = None

    # -- hooks -------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._state.trainer = trainer
        if stage != "fit":
            return
        if self.checkpointer is None:
            # a multi-process run (the process group exists now), or fit(ckpt_path=<a path>)
            # did not ask for ckpt_path
            self._open(trainer)
        elif trainer.world_size > 1:
            raise ConfigError(
                "spotckpt: this multi-process run was not recognised before Lightning created its "
                "process group (neither WORLD_SIZE nor LOCAL_RANK was set); launch it with "
                "Lightning's strategy='ddp' or with torchrun")
        if trainer.world_size > 1 and signal.SIGTERM in self.checkpointer.config.signals:
            bypass_sigterm_notifier(trainer)  # the Checkpointer's agreement replaces it; see _stop

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        loaded = trainer.ckpt_path
        expected = self._resume_file
        other = ckpt.restored_step is not None and not (
            (loaded is None and expected is None) or
            (loaded is not None and expected is not None and
             os.path.abspath(str(loaded)) == os.path.abspath(str(expected))))
        if trainer.world_size > 1:  # refuse on every rank, or the others would wait for it
            other = bool(trainer.strategy.reduce_boolean_decision(other, all=False))
        if other:
            raise ConfigError(
                f"spotckpt: a checkpoint at step {ckpt.restored_step} exists in {ckpt.local_dir} "
                f"(or the remote) but fit(ckpt_path={str(loaded)!r}) loads another one; call "
                "fit(model) or fit(model, ckpt_path='last') to resume it"
                + (" (and give no ModelCheckpoint with save_last=True in a multi-process run)"
                   if trainer.world_size > 1 else ""))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        restored = self._state.restored
        if restored is not None:
            # Lightning has restored everything else by now; the RNG goes back here, where
            # the uninterrupted run stood when it saved: before fetching the next batch.
            _state.set_rng_state(restored["rng"])
            self._state.restored = None
        self._drop_resume_file()
        made = data_position(trainer, self._state, restored)
        self._first_epoch = trainer.current_epoch if made else -1

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # From the second epoch on, the fit loop calls iter() on the train loader right after
        # this hook: its order comes from the RNG as it is now.
        loader = plain_loader(trainer)
        if loader is not None and trainer.current_epoch > self._first_epoch:
            self._state.epoch_rng = _batches.epoch_rng(loader)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ckpt = self.checkpointer
        if ckpt is None or self.interrupted or _accumulating(trainer, batch_idx):
            return
        ckpt.step = trainer.global_step
        ckpt.boundary()  # with several ranks, all of them agree here on a notice any one got
        if ckpt.interrupted:
            self._stop(trainer)

    def _stop(self, trainer: Any) -> None:
        self.interrupted = True
        trainer.should_stop = True
        if self.exit_on_interrupt:
            # End fit right after this batch, on every rank alike, the way Lightning ends it on
            # its own SIGTERM (SIGTERMException): `should_stop` alone would run a validation
            # epoch first, and is ignored until min_epochs/min_steps are reached.
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning ends a SIGTERMed fit by raising SIGTERMException (a SystemExit with no
        # status, i.e. exit 0) after the batch; other exceptions end here too. The trainer's
        # `teardown` hooks do not run on this path, so close here.
        ckpt = self.checkpointer
        if ckpt is not None:
            if ckpt.should_stop and not ckpt.interrupted:
                ckpt.step = trainer.global_step  # e.g. SIGTERM during validation
            self._close(raise_errors=False)
        if self.interrupted and self.exit_on_interrupt and isinstance(exception, SystemExit):
            exception.code = EXIT_INTERRUPTED
            exit_after_launcher(trainer, min(self._grace_left, 30.0))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if stage == "fit":
            ckpt.step = trainer.global_step
            ckpt.boundary()  # a notice that came after the last batch (agreed by all ranks)
            if ckpt.interrupted:
                self.interrupted = True
            else:
                ckpt.save()  # the end of training (skipped if this step is already saved)
        self._close(raise_errors=True)
        if stage == "fit" and self.interrupted and self.exit_on_interrupt:
            exit_after_launcher(trainer, min(self._grace_left, 30.0))
            raise SystemExit(EXIT_INTERRUPTED)

    def _close(self, *, raise_errors: bool) -> None:
        ckpt, self.checkpointer = self.checkpointer, None
        self._drop_resume_file()
        self._state.restored = None
        trainer = self._state.trainer
        if trainer is not None:
            restore_sigterm_notifier(trainer)  # (see setup)
        if ckpt is None:
            return
        notice = ckpt.notice
        try:
            ckpt.close(raise_errors=raise_errors)
        finally:
            self.interrupted = self.interrupted or ckpt.interrupted
            self._grace_left = max(0.0, notice.seconds_left() - 1.0) if notice else 0.0

    # Lightning's OnExceptionCheckpoint state is not ours to keep.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _accumulating(trainer: Any, batch_idx: int) -> bool:
    """True between the batches of one gradient accumulation: not a step boundary."""
    n = trainer.accumulate_grad_batches
    return n > 1 and (batch_idx + 1) % n != 0 and (batch_idx + 1) != trainer.num_training_batches
