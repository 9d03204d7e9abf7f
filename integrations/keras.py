"""Keras 3: one callback makes ``model.fit`` survive spot interruptions.

    from spotckpt.integrations.keras import SpotCheckpoint

    model.fit(x, y, epochs=20, callbacks=[SpotCheckpoint(every_n_batches=200)])

What it does, beyond Keras' ``BackupAndRestore`` (epoch granularity, local files only):

- Saves every ``every_n_batches`` batches and/or ``every_seconds``: all model variables
  (weights, normalisation statistics, dropout seed-generator states), the optimizer's
  variables, the compiled metrics' accumulators, the epoch and the batch within it, and the
  Python, numpy and torch RNG states, through :class:`spotckpt.Checkpointer` (local commit,
  upload to the remote, retention).
- On an interruption notice it saves after the current batch, makes the save durable within
  the deadline, stops ``fit`` and, by default, ends the process with status 143. The
  batches of the interrupted epoch that finished are kept.
- At the start of the next ``fit`` it restores the newest checkpoint, locally or from the
  remote (an empty local dir on a new machine is the normal case), and continues in the
  same epoch at the next batch: the RNG is put back as it was when that epoch started, so the
  shuffled order is drawn again identically, and the batches already trained are fetched
  but not trained on. A first run with nothing to restore starts from scratch; a job that
  had finished trains nothing more.

What is exact (tested with ``KERAS_BACKEND=torch``): weights are identical to an
uninterrupted run's, at epoch boundaries and mid-epoch, when ``fit`` gets arrays (numpy or
torch) with ``shuffle=True`` or ``False``, or any input whose order depends only on the epoch
and the global RNGs, and the backend computes deterministically (CPU, fixed threads). With
TensorFlow, ``tf.data`` shuffles with TF's own random state, which is not captured: resume
is then exact at epoch boundaries only. Skipping the finished batches uses the same
mechanism on the TensorFlow and JAX backends, which are untested here. The state of other
callbacks (``EarlyStopping``'s patience, ``ReduceLROnPlateau``) is not saved.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

from spotckpt import Checkpointer
from spotckpt import _state
from spotckpt._checkpointer import EXIT_INTERRUPTED
from spotckpt._errors import ConfigError
from spotckpt._events import log

from ._common import UNSET, checkpointer_options, pack_array, require, unpack_array

__all__ = ["SpotCheckpoint"]


def _keras() -> Any:
    return require("keras", "keras", "keras")


@functools.lru_cache(maxsize=None)
def _implementation() -> type:
    class _SpotCheckpoint(SpotCheckpoint, _keras().callbacks.Callback):
        pass

    _SpotCheckpoint.__name__ = _SpotCheckpoint.__qualname__ = "SpotCheckpoint"
    return _SpotCheckpoint


def _pack(variables: list) -> list[dict[str, Any]]:
    return [{"path": v.path, **pack_array(_numpy(v))} for v in variables]


def _numpy(v: Any) -> Any:
    import numpy as np

    return np.asarray(_keras().ops.convert_to_numpy(v.value))


def _assign(variables: list, saved: list[Mapping[str, Any]], what: str) -> None:
    if len(variables) != len(saved) or any(tuple(v.shape) != tuple(s["shape"]) for v, s in zip(variables, saved)):
        raise ConfigError(f"spotckpt: the checkpoint's {what} ({len(saved)} variables) do not match "
                          f"this model's ({len(variables)}); was the model changed? Use a new "
                          "local_dir/remote for a different model")
    for v, s in zip(variables, saved):
        v.assign(unpack_array(s))


class _ModelState:
    """The Checkpointer's view of a model in ``fit``: variables, position and RNGs."""

    def __init__(self) -> None:
        self.model: Any = None
        self.position: dict[str, Any] = {}
        self.restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        m = self.model
        return {"variables": _pack(m.variables),
                "optimizer": _pack(m.optimizer.variables) if m.optimizer is not None else [],
                "metrics": _pack(m.metrics_variables), "rng": _state.rng_state(), **self.position}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.restored = dict(sd)


class SpotCheckpoint:
    """Keras 3 callback: periodic and notice-triggered saves, and batch-exact resume.

    Args:
        every_n_batches: save every N training batches (counted over the whole job).
        every_seconds: save every S seconds (either, both or neither; with neither, only
            interruptions and the end of training save).
        local_dir, remote, keep_last, grace_seconds, signals, storage_options: as for
            :class:`spotckpt.Checkpointer` (and their ``SPOTCKPT_*`` variables).
        exit_on_interrupt: after an interruption save, end the process with status 143 when
            ``fit`` ends. With False, ``fit`` returns and :attr:`interrupted` is True.

    Example:
        >>> model.fit(x, y, epochs=20, callbacks=[SpotCheckpoint(every_n_batches=200)])  # doctest: +SKIP

    Raises:
        spotckpt.MissingDependencyError: keras (3) is not installed.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SpotCheckpoint:
        # The real class subclasses keras.callbacks.Callback; it is built on first use so
        # that importing this module does not import keras.
        if cls is SpotCheckpoint:
            cls = _implementation()
        return object.__new__(cls)

    def __init__(self, every_n_batches: int | None = None, every_seconds: float | None = None, *,
                 local_dir: str | os.PathLike[str] | None = None, remote: str | None = UNSET,
                 keep_last: int | None = None, grace_seconds: float | None = None,
                 signals: tuple[int | str, ...] | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 exit_on_interrupt: bool = True) -> None:
        super().__init__()
        self.every_n_batches, self.every_seconds = every_n_batches, every_seconds
        self.exit_on_interrupt = exit_on_interrupt
        self._options = checkpointer_options(local_dir=local_dir, remote=remote, keep_last=keep_last,
                                             grace_seconds=grace_seconds, signals=signals,
                                             storage_options=storage_options)
        self.checkpointer: Checkpointer | None = None
        self.interrupted = False
        self._state = _ModelState()
        self._epoch = 0
        self._epoch_start_step = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None  # restored, until the resumed epoch starts
        self._skip_until = 0                        # batches of this epoch already trained
        self._resume_rng: dict[str, Any] | None = None  # RNG after the last of those batches
        self._skipping = False
        self._train_function: Callable | None = None

    # -- hooks -------------------------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        if self.checkpointer is not None:  # a previous fit ended by an exception
            self._close(raise_errors=False)
        self.interrupted = False
        model = self._state.model = self.model
        self._state.restored = None
        ckpt = Checkpointer({"keras": self._state}, every_steps=self.every_n_batches,
                            every_seconds=self.every_seconds, exit_on_interrupt=False,
                            framework="keras", **self._options)
        ckpt.open()
        self.checkpointer = ckpt
        r, self._resume = self._state.restored, None
        self._state.restored = None
        if r is None:
            return
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        _assign(model.variables, r["variables"], "model variables")
        if model.optimizer is not None:
            _assign(model.optimizer.variables, r["optimizer"], "optimizer variables")
        epoch = self.params.get("epochs", 0) if r.get("finished") else r["epoch"]
        model._initial_epoch = epoch  # read by fit right after this hook (as BackupAndRestore does)
        self._resume = r
        log.warning("spotckpt: resuming Keras at epoch %d, batch %d (step %d)",
                    r["epoch"], r["batch"], ckpt.restored_step)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        r, self._resume = self._resume, None
        ckpt = self.checkpointer
        if r is not None:
            self.model._initial_epoch = None
            _state.set_rng_state(r["epoch_rng"])  # fit shuffles after this hook: same order
            self._skip_until = r["batch"]
            self._resume_rng = r["rng"]
            if self._skip_until:
                try:
                    _assign(self.model.metrics_variables, r["metrics"], "metrics")
                except ConfigError:
                    log.warning("spotckpt: metrics not restored; this epoch's logs cover the resumed batches only")
                self._wrap_train_function()
        self._epoch_start_step = (ckpt.step if ckpt is not None else 0) - self._skip_until
        self._epoch_rng = _state.rng_state()

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._skipping = batch < self._skip_until

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            return
        if self._skipping:
            if batch + 1 >= self._skip_until:  # the last batch trained before the interruption
                self._unwrap_train_function()
                self._skip_until, self._skipping = 0, False
                _state.set_rng_state(self._resume_rng)
            return
        if self.interrupted:
            return
        ckpt.step = self._epoch_start_step + batch + 1
        self._state.position = {"epoch": self._epoch, "batch": batch + 1, "epoch_rng": self._epoch_rng}
        ckpt.boundary()
        if ckpt.interrupted:
            self.interrupted = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        ckpt = self.checkpointer
        if ckpt is not None and ckpt.should_stop and not self.interrupted:
            self._at_epoch_start(epoch + 1)
            ckpt.boundary()  # a notice that came after the epoch's last batch
            self.interrupted = ckpt.interrupted
            self.model.stop_training = True

    def on_train_end(self, logs: Any = None) -> None:
        self._unwrap_train_function()
        ckpt = self.checkpointer
        if ckpt is None:
            return
        self.model._initial_epoch = None
        if not self.interrupted:
            self._at_epoch_start(self._epoch + 1, finished=not ckpt.should_stop)
            if not ckpt.should_stop:
                ckpt.save()  # the end of training (skipped if this step is already saved)
        self._close(raise_errors=True)
        if self.interrupted and self.exit_on_interrupt:
            raise SystemExit(EXIT_INTERRUPTED)

    # -- helpers -----------------------------------------------------------------------------
    def _at_epoch_start(self, epoch: int, *, finished: bool = False) -> None:
        rng = _state.rng_state()
        self._state.position = {"epoch": epoch, "batch": 0, "epoch_rng": rng, "finished": finished}

    def _wrap_train_function(self) -> None:
        """Make the model's train step a no-op for the batches trained before the interruption.

        Those batches are still fetched, so the input pipeline's order stays that of an
        uninterrupted run."""
        model = self.model
        original = self._train_function = model.train_function
        backend = _keras().backend.backend()
        steps = getattr(model, "steps_per_execution", 1) or 1

        def train_function(*args: Any, **kwargs: Any) -> Any:
            if not self._skipping:
                return original(*args, **kwargs)
            if backend == "jax":  # (state, data) -> (logs, state)
                return {}, args[0]
            if backend == "tensorflow":  # the step pulls its batches from the iterator
                for _ in range(steps):
                    next(args[0])
            return model.get_metrics_result()  # the restored metrics, as a step returns them

        model.train_function = train_function

    def _unwrap_train_function(self) -> None:
        if self._train_function is not None:
            self.model.train_function, self._train_function = self._train_function, None

    def _close(self, *, raise_errors: bool) -> None:
        ckpt, self.checkpointer = self.checkpointer, None
        self._resume = self._resume_rng = None
        self._skip_until, self._skipping = 0, False
        if ckpt is not None:
            try:
                ckpt.close(raise_errors=raise_errors)
            finally:
                self.interrupted = self.interrupted or ckpt.interrupted
