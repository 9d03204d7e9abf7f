"""XGBoost: a ``TrainingCallback`` and a drop-in ``train`` that resumes where it stopped.

    from spotckpt.integrations.xgboost import SpotCheckpoint, train

    booster = train(params, dtrain, num_boost_round=500, evals=[(dvalid, "valid")],
                    early_stopping_rounds=20, callbacks=[SpotCheckpoint(every_n_rounds=25)])

:func:`train` takes ``xgboost.train``'s arguments. It restores the newest checkpoint (local or
remote; an empty local dir on a new machine is the normal case), continues from that booster
and runs only the remaining rounds, with the evaluation history and early-stopping state
restored, so ``evals_result``, ``best_iteration`` and the stopping decision are those of an
uninterrupted run. On an interruption notice the callback saves after the current round,
makes it durable within the deadline and stops training; the process then ends with status
143 (``exit_on_interrupt``).

The callback also works inside a plain ``xgboost.train`` for saving, but that cannot resume
(it would train ``num_boost_round`` more rounds), so it refuses to start over an existing
checkpoint and points to :func:`train`.

What is exact: training that is deterministic per round (``subsample`` and ``colsample_*``
at 1, fixed ``nthread``) gives a resumed model identical to an uninterrupted run's. With row
or column subsampling XGBoost's random state lives in the process (a global generator, and a
column sampler each tree updater seeds once): a resumed run draws other samples, so its model
is valid but not the same one. ``SpotCheckpoint(reseed_each_round=True)`` makes each round's
randomness a function of the seed and the round number alone (the seed is set per round and
the updaters are rebuilt from the booster's config), so resumes are exact with subsampling
too, for ``tree_method`` ``hist``, ``approx`` and ``exact`` (docs/guides/xgboost.md
has the measured table). The printed round numbers of ``verbose_eval`` count from 0 again
after a resume.

No torch needed: without torch imported, checkpoints use the core's ``pickle-safe`` format
(the booster is stored as UBJSON bytes).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

from spotckpt import Checkpointer
from spotckpt._errors import SpotckptError
from spotckpt._events import log

from ._common import UNSET, checkpointer_options, interrupted_exit, require, schedule_options

__all__ = ["SpotCheckpoint", "train"]


def _xgb() -> Any:
    return require("xgboost", "xgboost", "xgboost")


@functools.lru_cache(maxsize=None)
def _implementation() -> type:
    class _SpotCheckpoint(SpotCheckpoint, _xgb().callback.TrainingCallback):
        pass

    _SpotCheckpoint.__name__ = _SpotCheckpoint.__qualname__ = "SpotCheckpoint"
    return _SpotCheckpoint


def _plain_history(log: Mapping[str, Mapping[str, Sequence[Any]]]) -> dict[str, dict[str, list]]:
    return {d: {m: [tuple(map(float, v)) if isinstance(v, tuple) else float(v) for v in vals]
                for m, vals in ms.items()} for d, ms in log.items()}


class _BoosterState:
    """The Checkpointer's view of a training run: booster bytes, rounds, history."""

    def __init__(self) -> None:
        self.booster: Any = None
        self.rounds = 0        # rounds trained by this job (over all restarts)
        self.start_rounds = 0  # rounds already in the xgb_model the job started from
        self.history: Mapping[str, Any] = {}
        self.seed: int | None = None  # the seed parameter, under reseed_each_round
        self.restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"model": bytes(self.booster.save_raw("ubj")), "rounds": self.rounds,
                "start_rounds": self.start_rounds, "history": _plain_history(self.history),
                "seed": self.seed}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.restored = dict(sd)


class SpotCheckpoint:
    """XGBoost callback: periodic and notice-triggered saves (see :func:`train` to resume).

    Args:
        every_n_rounds: save every N boosting rounds.
        every_seconds: save every S seconds (either, both or neither; with neither, only
            interruptions and the end of training save).
        local_dir, remote, keep_last, grace_seconds, signals, storage_options: as for
            :class:`spotckpt.Checkpointer` (and their ``SPOTCKPT_*`` variables).
        every: ``"auto"``: the interval chosen from the measured cost of a checkpoint and
            the job's interruption history, as for :class:`spotckpt.Checkpointer` (not with
            ``every_n_rounds`` or ``every_seconds``); ``failure_rate``, ``mtbf``,
            ``min_interval``, ``max_interval``: its settings.
        exit_on_interrupt: after an interruption save, end the process with status 143 when
            training returns. With False, training returns early and :attr:`interrupted` is True.
        reseed_each_round: before each round, set XGBoost's ``seed`` to one derived from the
            ``seed`` parameter and the round number, and rebuild the tree updaters (their
            column samplers), so that a resumed run draws the same row and column samples as
            an uninterrupted one: exact resumes with ``subsample``/``colsample_*`` < 1. The
            model differs from one trained without it (other samples are drawn); use it from
            the first run of a job on.

    Example:
        >>> bst = train(params, dtrain, 500, callbacks=[SpotCheckpoint(every_n_rounds=25)])  # doctest: +SKIP

    Raises:
        spotckpt.MissingDependencyError: xgboost is not installed.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SpotCheckpoint:
        # The real class subclasses xgboost's TrainingCallback; it is built on first use so
        # that importing this module does not import xgboost.
        if cls is SpotCheckpoint:
            cls = _implementation()
        return object.__new__(cls)

    def __init__(self, every_n_rounds: int | None = None, every_seconds: float | None = None, *,
                 local_dir: str | os.PathLike[str] | None = None, remote: str | None = UNSET,
                 keep_last: int | None = None, grace_seconds: float | None = None,
                 signals: tuple[int | str, ...] | None = None,
                 storage_options: Mapping[str, Any] | None = None,
                 exit_on_interrupt: bool = True, every: str | None = None,
                 failure_rate: float | None = None, mtbf: float | None = None,
                 min_interval: float | None = None, max_interval: float | None = None, reseed_each_round: bool = False) -> None:
        super().__init__()
        self.every_n_rounds, self.every_seconds = every_n_rounds, every_seconds
        self.exit_on_interrupt = exit_on_interrupt
        self.reseed_each_round = reseed_each_round
        self._options = checkpointer_options(local_dir=local_dir, remote=remote, keep_last=keep_last,
                                             grace_seconds=grace_seconds, signals=signals,
                                             storage_options=storage_options)
        self._options.update(schedule_options(  # every="auto": a bad setting fails here
            every=every, failure_rate=failure_rate, mtbf=mtbf, min_interval=min_interval,
            max_interval=max_interval, every_steps=every_n_rounds, every_seconds=every_seconds,
            steps_name="every_n_rounds"))
        self.checkpointer: Checkpointer | None = None
        self.interrupted = False
        self._state = _BoosterState()
        self._managed = False      # set by train(): the restored booster is its xgb_model
        self._offset = 0           # rounds done before this xgboost.train call
        self._prefill: dict | None = None
        self._history: Mapping[str, Any] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> dict[str, Any] | None:
        """Open the Checkpointer and restore. Returns the restored state (or None)."""
        if self.checkpointer is None:
            self.interrupted = False
            self._state.restored = None
            ckpt = Checkpointer({"xgboost": self._state}, every_steps=self.every_n_rounds,
                                every_seconds=self.every_seconds, exit_on_interrupt=False,
                                framework="xgboost", **self._options)
            ckpt.open()
            self.checkpointer = ckpt
        return self._state.restored

    def close(self, *, raise_errors: bool = True) -> None:
        ckpt, self.checkpointer = self.checkpointer, None
        if ckpt is not None:
            try:
                ckpt.close(raise_errors=raise_errors)
            finally:
                self.interrupted = self.interrupted or ckpt.interrupted

    @property
    def history(self) -> dict[str, Any]:
        """The evaluation history of the whole job, restored rounds included."""
        if self._history is not None:
            return self._history  # type: ignore[return-value]
        restored = self._state.restored or {}
        return collections.OrderedDict(
            (d, collections.OrderedDict((m, list(v)) for m, v in ms.items()))
            for d, ms in restored.get("history", {}).items())

    # -- TrainingCallback --------------------------------------------------------------------
    def before_training(self, model: Any) -> Any:
        if not isinstance(model, _xgb().Booster):
            raise SpotckptError("spotckpt: SpotCheckpoint works with xgboost.train (and this module's "
                                "train), not with xgboost.cv")
        restored = self.open()
        if restored is not None and not self._managed:
            self.close(raise_errors=False)
            raise SpotckptError(
                f"spotckpt: a checkpoint of round {restored['rounds']} exists; plain xgboost.train "
                "cannot resume it; call spotckpt.integrations.xgboost.train with the same arguments")
        self._history = None
        if restored is not None:
            self._offset, self._state.start_rounds = restored["rounds"], restored["start_rounds"]
            self._prefill = self.history
        else:
            self._offset, self._state.start_rounds = 0, model.num_boosted_rounds()
        self._state.rounds = self._offset
        self._state.booster = model
        if self.reseed_each_round:
            # The base of the per-round seeds: the seed parameter, as the job's first run had
            # it (a resumed booster's config holds the last round's seed).
            seed = (restored or {}).get("seed")
            if seed is None:
                seed = int(json.loads(model.save_config())["learner"]["generic_param"]["seed"])
            self._state.seed = int(seed)
        return model

    def before_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        if self._prefill is not None:
            # evals_log is xgboost's own history, which train() returns in evals_result and
            # EarlyStopping reads: give it the rounds trained before the interruption.
            evals_log.update(self._prefill)
            self._prefill = None
        if self.reseed_each_round:
            # XGBoost seeds its global generator when the seed changes, and each tree updater
            # seeds its column sampler from it once, when first used: reloading the config
            # rebuilds the updaters, so they draw from this round's seed as a resumed run's do.
            model.load_config(model.save_config())
            model.set_param({"seed": _round_seed(self._state.seed or 0, self._offset + epoch)})
        return False

    def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
        ckpt = self.checkpointer
        assert ckpt is not None, "before_training was not called"
        self._state.booster, self._state.history, self._history = model, evals_log, evals_log
        self._state.rounds = ckpt.step = self._offset + epoch + 1
        ckpt.boundary()
        if ckpt.interrupted:
            self.interrupted = True
            return True
        return False

    def after_training(self, model: Any) -> Any:
        ckpt = self.checkpointer
        if ckpt is None:
            return model
        self._state.booster = model
        if self._state.seed is not None:
            model.set_param({"seed": self._state.seed})  # the user's again, not the last round's
        ckpt.step = self._state.rounds
        if not ckpt.should_stop:
            ckpt.save()  # the end of training (skipped if this round is already saved)
        self.close()
        if self.interrupted and self.exit_on_interrupt:
            raise interrupted_exit(ckpt)  # gone by the deadline, whatever the load
        return model


def _round_seed(seed: int, rnd: int) -> int:
    """The seed of round ``rnd``: a hash, so that the runs of a seed sweep (seed 0, 1, 2, ...)
    do not share their rounds' samples shifted by one round, as ``seed + rnd`` would."""
    digest = hashlib.blake2b(f"{seed}:{rnd}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _replay_early_stopping(callbacks: Sequence[Any], booster: Any, history: Mapping[str, Any],
                           rounds: int, start_rounds: int) -> bool:
    """Feed the restored evaluation history through each ``EarlyStopping`` callback, round by
    round, as training did. Returns True if one of them had stopped training."""
    es_type = _xgb().callback.EarlyStopping
    stoppers = [c for c in callbacks if isinstance(c, es_type)]
    stop = False
    for es in stoppers:
        es.starting_round = start_rounds  # as its before_training set it in the first run
        partial: dict[str, dict[str, list]] = {d: {m: [] for m in ms} for d, ms in history.items()}
        for r in range(rounds):
            for d, ms in history.items():
                for m, vals in ms.items():
                    partial[d][m].append(vals[r])
            if es.after_iteration(booster, r, partial):
                stop = True
                break
    return stop


def train(params: dict[str, Any], dtrain: Any, num_boost_round: int = 10, *,
          evals: Sequence[tuple[Any, str]] | None = None, obj: Any = None,
          maximize: bool | None = None, early_stopping_rounds: int | None = None,
          evals_result: dict | None = None, verbose_eval: bool | int | None = True,
          xgb_model: Any = None, callbacks: Sequence[Any] | None = None,
          custom_metric: Any = None) -> Any:
    """``xgboost.train`` that resumes from the newest spotckpt checkpoint.

    Same arguments and result as ``xgboost.train``. A :class:`SpotCheckpoint` in
    ``callbacks`` sets the cadence and storage; without one, a default one (settings from
    ``SPOTCKPT_*``) is added. ``num_boost_round`` counts the whole job: after a resume at round
    ``r`` only ``num_boost_round - r`` rounds are trained.

    Example:
        >>> bst = train(params, dtrain, 500, evals=[(dvalid, "valid")], early_stopping_rounds=20,
        ...             callbacks=[SpotCheckpoint(every_n_rounds=25)])  # doctest: +SKIP
    """
    xgb = _xgb()
    callbacks = list(callbacks or [])
    spot = next((c for c in callbacks if isinstance(c, SpotCheckpoint)), None) or SpotCheckpoint()
    # First, because xgboost stops calling callbacks in a round once one asks to stop, and
    # the checkpoint must see every round. Then what xgboost.train would add, in its order.
    callbacks = [spot] + [c for c in callbacks if c is not spot]
    if verbose_eval:
        callbacks.append(xgb.callback.EvaluationMonitor(period=1 if verbose_eval is True else int(verbose_eval)))
    if early_stopping_rounds:
        callbacks.append(xgb.callback.EarlyStopping(rounds=early_stopping_rounds, maximize=maximize))
    spot._managed = True
    try:
        restored = spot.open()
        rounds = num_boost_round
        if restored is not None:
            booster = xgb.Booster(model_file=bytearray(restored["model"]))
            done = restored["rounds"]
            stopped = _replay_early_stopping(callbacks, booster, restored["history"], done,
                                             restored["start_rounds"])
            xgb_model, rounds = booster, 0 if stopped else max(0, num_boost_round - done)
            log.warning("spotckpt: resuming XGBoost at round %d%s", done,
                        " (early stopping had ended training)" if stopped else "")
        bst = xgb.train(params, dtrain, rounds, evals=evals, obj=obj, maximize=maximize,
                        early_stopping_rounds=None, evals_result=None, verbose_eval=False,
                        xgb_model=xgb_model, callbacks=callbacks, custom_metric=custom_metric)
    except BaseException:
        spot.close(raise_errors=False)
        raise
    finally:
        spot._managed = False
    if evals_result is not None:
        evals_result.update(spot.history)
    return bst
