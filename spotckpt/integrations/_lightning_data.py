"""Lightning: the data position of a plain shuffled train ``DataLoader`` (see
``spotckpt/_state/_batches.py`` for the mechanism; ``lightning.py`` calls this from its hooks).

``state`` is the callback's ``_TrainerState``: its ``epoch_rng`` is saved with every
checkpoint and is the RNG the current epoch's ``iter()`` started from.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

from spotckpt._state import _batches


def plain_loader(trainer: Any) -> Any:
    """The train loader when it is one map-style ``DataLoader`` that cannot resume itself
    (no ``state_dict``), else None."""
    combined = trainer.fit_loop._combined_loader
    if combined is None or len(combined.flattened) != 1:
        return None
    dl = combined.flattened[0]
    return dl if _batches._map_style(dl) and not _batches.stateful(dl) else None


def data_position(trainer: Any, state: Any, restored: Mapping[str, Any] | None) -> bool:
    """Put a plain shuffled train loader where the checkpoint left it; True if this epoch's
    iterator was replaced.

    Lightning cannot fast-forward a ``DataLoader`` without ``state_dict``: resumed mid-epoch,
    it iterates a new order from the start. The fit loop has made this epoch's iterator
    already (before any hook); it is replaced here. Resumed mid-epoch: from the epoch's
    recorded RNG (the same order), after the batches Lightning counted as fetched, with the
    global RNG left as just restored. Otherwise (a fresh fit, a resume at an epoch's end) by
    one that calls ``iter()`` at its first fetch, where the uninterrupted run's ``iter()``
    stood (after the validation that ends the previous epoch), and records the RNG there.
    """
    loader = plain_loader(trainer)
    mode = getattr(trainer.fit_loop._combined_loader, "_iterator", None)
    if loader is None or mode is None or not getattr(mode, "iterators", None):
        return False
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    saved = restored.get("epoch_rng") if restored is not None else None
    mid_epoch = restored is not None and 0 < done < trainer.num_training_batches
    if mid_epoch and saved is None:
        return False  # a checkpoint written before the data position was kept: Lightning's warning
    import torch

    old = mode.iterators[0]
    stop = getattr(old, "_shutdown_workers", None)
    if callable(stop):
        stop()  # the workers the fit loop started for the iterator replaced here
    if getattr(loader, "_iterator", None) is old:
        loader._iterator = None
    if not mid_epoch:
        mode.iterators[0] = _FirstFetch(loader, state)
        return True
    # Lightning warns next that it cannot resume this loader mid-epoch: it is resumed here.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    now = torch.get_rng_state()
    try:
        state.epoch_rng = saved
        mode.iterators[0] = _batches.iter_from(loader, done, saved)
    finally:
        torch.set_rng_state(now)
    return True


class _FirstFetch:
    """``iter(loader)``, made at the first fetch; the RNG it starts from is recorded."""

    def __init__(self, loader: Any, state: Any) -> None:
        self._loader, self._state, self._it = loader, state, None

    def __iter__(self) -> _FirstFetch:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._state.epoch_rng = _batches.epoch_rng(self._loader)
            self._it = iter(self._loader)
        return next(self._it)
