"""Keras 3: one callback makes ``model.fit`` survive spot interruptions.

    from spotckpt.integrations.keras import SpotCheckpoint

    model.fit(x, y, epochs=20, callbacks=[SpotCheckpoint(every_n_batches=200)])

What it does, beyond Keras' ``BackupAndRestore`` (epoch granularity, local files only):

- Saves every ``every_n_batches`` batches and/or ``every_seconds``: all model variables
  (weights, normalisation statistics, dropout seed-generator states), the optimizer's
  variables, the compiled metrics' accumulators, the epoch and the batch within it, and the
  Python, numpy and torch RNG states, through :class:`spotckpt.Checkpointer` (local commit,
  upload to the remote, retention).
- On an interruption notice it saves after the current batch (after the epoch's validation
  when that was the epoch's last batch), makes the save durable within the deadline, stops
  ``fit`` and, by default, ends the process with status 143. The batches of the interrupted
  epoch that finished are kept.
- At the start of the next ``fit`` it restores the newest checkpoint, locally or from the
  remote (an empty local dir on a new machine is the normal case), and continues in the
  same epoch at the next batch: the RNG is put back as it was when that epoch started, so the
  shuffled order is drawn again identically, and the batches already trained are fetched
  again inside Keras' epoch iterator (so the input pipeline is where it was), never trained
  on, never shown to any callback. A save on an epoch's last batch is taken at the epoch's
  end, as the start of the next epoch: resuming there replays nothing, and a job that had
  finished trains and fetches nothing more. A first run with nothing to restore starts from
  scratch.

What is exact (tested on the torch, JAX and TensorFlow backends, measured by
``bench/keras_exactness.py``, docs/guides/keras.md): weights are identical to an
uninterrupted run's, mid-epoch and at epoch ends, for arrays with any ``shuffle``, a
``PyDataset``, a torch ``DataLoader``, with ``steps_per_execution``, when the run is seeded
(``keras.utils.set_random_seed``) and the backend computes deterministically (CPU, fixed
threads); not for ``tf.data`` with ``.shuffle``, whose state is TensorFlow's own (not even
at epoch ends). The fast-forward uses Keras' ``fit`` internals (3.15); where they are not found, a
mid-epoch checkpoint resumes at its epoch's first batch, with a warning. With JAX, input of
unknown length interrupted on its epoch's last batch resumes into an epoch with no batch
left, which Keras' JAX ``fit`` does not support. The state of other callbacks
(``EarlyStopping``'s patience, ``ReduceLROnPlateau``) is not saved.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Iterator, Mapping

from spotckpt import Checkpointer
from spotckpt._errors import ConfigError
from spotckpt._events import log
from spotckpt._state import _snapshot as _state

from ._common import UNSET, checkpointer_options, interrupted_exit, pack_array, require, schedule_options, unpack_array

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


def _fit_epoch_iterator(model: Any) -> Any | None:
    """The ``EpochIterator`` of the ``fit`` running on ``model``: a local variable of Keras'
    ``fit`` (every backend's, Keras 3.15), found on the call stack; None if it is not there."""
    try:
        from keras.src.trainers.epoch_iterator import EpochIterator
    except ImportError:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "fit" and "epoch_iterator" in code.co_varnames:
            local = frame.f_locals
            if local.get("self") is model and isinstance(local.get("epoch_iterator"), EpochIterator):
                return local["epoch_iterator"]
        frame = frame.f_back
    return None


def _start_epoch_at(iterator: Any, first: int, then: Callable[[], None]) -> None:
    """Make the next epoch of Keras' ``EpochIterator`` begin at batch ``first``.

    Batches ``0 .. first-1`` are still fetched, so the input pipeline ends where an
    uninterrupted run's does, but inside the iterator: neither the train step nor any
    callback sees them. ``then()`` runs after them, before the first batch that is trained.
    Every backend's ``fit`` loops over ``(begin, end, data)`` from ``_enumerate_iterator()``
    and pulls batches ``begin..end`` from ``data`` (itself, or inside its train step).
    """
    enumerate_epoch = iterator._enumerate_iterator

    def resumed() -> Iterator[Any]:
        del iterator._enumerate_iterator  # this epoch only
        steps = enumerate_epoch()
        for begin, end, data in steps:
            if begin >= first:
                then()
                yield begin, end, data
                yield from steps
                return
            for _ in range(end + 1 - begin):
                try:
                    next(data)
                except StopIteration:  # the data ended sooner than in the interrupted run
                    then()
                    return
        then()

    iterator._enumerate_iterator = resumed


def _build_compiled_metrics(model: Any, iterator: Any) -> None:
    """Create the compiled metrics' variables, to restore their accumulators before the first
    step. The TensorFlow trainer creates them when it traces that step (the others before
    ``fit`` calls any callback): build them from the dataset's element spec, fetching nothing."""
    metrics = getattr(model, "_compile_metrics", None)
    spec = getattr(getattr(iterator, "_distributed_dataset", None), "element_spec", None)
    if metrics is not None and not metrics.built and spec is not None:
        model._symbolic_build(data_batch=spec)


class _ModelState:
    """The Checkpointer's view of a model in ``fit``: variables, position and RNGs."""

    def __init__(self) -> None:
        self.model: Any = None
        self.position: dict[str, Any] = {}
        self.restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        m = self.model
        # During fit, Keras' JAX trainer keeps the state in its own arrays and the variables
        # hold no value (reading one raised "'NoneType' object is not callable"): put it back.
        sync = getattr(m, "jax_state_sync", None)
        if sync is not None:
            sync()
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
        every: ``"auto"``: the interval chosen from the measured cost of a checkpoint and
            the job's interruption history, as for :class:`spotckpt.Checkpointer` (not with
            ``every_n_batches`` or ``every_seconds``); ``failure_rate``, ``mtbf``,
            ``min_interval``, ``max_interval``: its settings.
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
                 exit_on_interrupt: bool = True, every: str | None = None,
                 failure_rate: float | None = None, mtbf: float | None = None,
                 min_interval: float | None = None, max_interval: float | None = None) -> None:
        super().__init__()
        self.every_n_batches, self.every_seconds = every_n_batches, every_seconds
        self.exit_on_interrupt = exit_on_interrupt
        self._options = checkpointer_options(local_dir=local_dir, remote=remote, keep_last=keep_last,
                                             grace_seconds=grace_seconds, signals=signals,
                                             storage_options=storage_options)
        self._options.update(schedule_options(  # every="auto": a bad setting fails here
            every=every, failure_rate=failure_rate, mtbf=mtbf, min_interval=min_interval,
            max_interval=max_interval, every_steps=every_n_batches, every_seconds=every_seconds,
            steps_name="every_n_batches"))
        self.checkpointer: Checkpointer | None = None
        self.interrupted = False
        self._state = _ModelState()
        self._epoch = 0
        self._epoch_start_step = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None  # restored, until the resumed epoch starts
        self._iterator: Any = None   # the running fit's EpochIterator
        self._at_epoch_end = False   # the epoch's last batch is done; its boundary is at on_epoch_end

    # -- hooks -------------------------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        if self.checkpointer is not None:  # a previous fit ended by an exception
            self._close(raise_errors=False)
        self.interrupted = False
        model = self._state.model = self.model
        self._state.restored = None
        self._iterator = _fit_epoch_iterator(model)
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
        self._epoch = epoch - 1
        self._resume = r
        log.warning("spotckpt: resuming Keras at epoch %d, batch %d (step %d)",
                    r["epoch"], r["batch"], ckpt.restored_step)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._at_epoch_end = False
        r, self._resume = self._resume, None
        ckpt = self.checkpointer
        done = 0  # batches of this epoch trained before the interruption
        if r is not None:
            self.model._initial_epoch = None
            _state.set_rng_state(r["epoch_rng"])  # fit shuffles after this hook: same order
            done = r["batch"]
            if done and self._iterator is None:
                log.warning("spotckpt: cannot fast-forward this Keras version's fit: epoch %d "
                            "starts again from its first batch (not an exact resume)", epoch)
                done = 0
            if done:
                _build_compiled_metrics(self.model, self._iterator)
                try:
                    _assign(self.model.metrics_variables, r["metrics"], "metrics")
                except ConfigError:
                    log.warning("spotckpt: metrics not restored; this epoch's logs cover the resumed batches only")
                rng = r["rng"]
                _start_epoch_at(self._iterator, done, lambda: _state.set_rng_state(rng))
        self._epoch_start_step = (ckpt.step if ckpt is not None else 0) - done
        self._epoch_rng = _state.rng_state()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        ckpt = self.checkpointer
        if ckpt is None or self.interrupted:
            return
        ckpt.step = self._epoch_start_step + batch + 1
        n = self._iterator.num_batches if self._iterator is not None else self.params.get("steps")
        if n and batch + 1 >= n:
            # The epoch's last batch: save (periodically or on a notice) at on_epoch_end, after
            # validation, as the start of the next epoch; a resume then replays nothing of
            # this one, and one of a finished fit fetches nothing.
            self._at_epoch_end = True
            return
        self._state.position = {"epoch": self._epoch, "batch": batch + 1, "epoch_rng": self._epoch_rng}
        ckpt.boundary()
        if ckpt.interrupted:
            self.interrupted = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        ckpt = self.checkpointer
        if ckpt is None or self.interrupted or not (self._at_epoch_end or ckpt.should_stop):
            return
        # (a callback before this one may have stopped training: EarlyStopping's end of the job)
        finished = epoch + 1 >= self.params.get("epochs", 0) or self.model.stop_training
        self._at_epoch_start(epoch + 1, finished=finished and not ckpt.should_stop)
        ckpt.boundary()  # the periodic save due at the last batch, or a notice since
        if ckpt.interrupted:
            self.interrupted = True
            self.model.stop_training = True

    def on_train_end(self, logs: Any = None) -> None:
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
            raise interrupted_exit(ckpt)  # gone by the deadline, whatever the load

    # -- helpers -----------------------------------------------------------------------------
    def _at_epoch_start(self, epoch: int, *, finished: bool = False) -> None:
        rng = _state.rng_state()
        self._state.position = {"epoch": epoch, "batch": 0, "epoch_rng": rng, "finished": finished}

    def _close(self, *, raise_errors: bool) -> None:
        ckpt, self.checkpointer = self.checkpointer, None
        self._resume = None
        if self._iterator is not None:  # a fast-forward never started (fit stopped first)
            self._iterator.__dict__.pop("_enumerate_iterator", None)
        self._iterator = None
        if ckpt is not None:
            try:
                ckpt.close(raise_errors=raise_errors)
            finally:
                self.interrupted = self.interrupted or ckpt.interrupted
