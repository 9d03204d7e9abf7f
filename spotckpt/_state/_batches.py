"""Exact data position: :meth:`Checkpointer.batches`, and what the Lightning callback shares.

A shuffled ``DataLoader`` draws its order when an epoch's iterator starts: ``iter(loader)``
draws the workers' base seed, and the sampler draws its permutation seed at its first index
(from the global torch RNG, or from the loader's/sampler's ``generator``). So the order of
epoch ``e`` is fixed by the generators' states just before that ``iter()``. :class:`Batches`
owns the iterator across epochs, records those states at each epoch's start and counts the
batches handed out. On resume it puts the recorded states back, calls ``iter()`` again (the
same base seed, the same permutation), skips the consumed batches at the sampler (their
samples are never loaded), and puts the global RNG back as the checkpoint left it, so
dropout and everything after draws exactly what the uninterrupted run drew.

A loader with its own ``state_dict``/``load_state_dict`` (torchdata's ``StatefulDataLoader``)
keeps its position itself; :class:`Batches` then only keeps the global RNG unchanged across
the ``iter()`` that restores it (that ``iter()`` draws a base seed the uninterrupted run drew
at the epoch's start, not mid-epoch).
"""
from __future__ import annotations

import copy
import functools
import sys
from typing import Any, Callable, Iterator, Mapping

KEY = "__spotckpt_batches__"  # the checkpoint entry holding every Batches' state, by name


def _torch() -> Any:
    return sys.modules["torch"]


# -- the generators an epoch's order comes from ----------------------------------------------
def generators(loader: Any) -> list[Any]:
    """The explicit ``torch.Generator`` objects ``iter(loader)`` draws from (the loader's, its
    sampler's, its batch sampler's sampler's), each once."""
    torch = _torch()
    found: list[Any] = []
    bs = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), getattr(bs, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def epoch_rng(loader: Any) -> dict[str, Any]:
    """The states that fix the next ``iter(loader)``'s order and worker seeds. ``reset``: that
    ``iter()`` will reuse persistent workers (no base seed drawn, only the sampler's seed)."""
    reset = bool(getattr(loader, "persistent_workers", False) and getattr(loader, "_iterator", None) is not None)
    return {"torch": _torch().get_rng_state(), "generators": [g.get_state() for g in generators(loader)],
            "reset": reset}


def set_epoch_rng(loader: Any, st: Mapping[str, Any]) -> None:
    _torch().set_rng_state(st["torch"])
    gens = generators(loader)
    if len(gens) != len(st["generators"]):
        raise ValueError("spotckpt: the loader's generators differ from the checkpoint's "
                         f"({len(gens)} now, {len(st['generators'])} saved)")
    for g, s in zip(gens, st["generators"]):
        g.set_state(s)


# -- an iterator that starts after N batches ---------------------------------------------------
class _Skip:
    """A sampler (or batch sampler) whose first iteration starts after ``skip`` items; later
    iterations are the inner sampler's own."""

    def __init__(self, inner: Any, skip: int, before: Callable[[], None] | None) -> None:
        self.inner, self.skip, self.before = inner, skip, before

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> _SkipIter:
        return _SkipIter(self.inner, self.skip, self.before)


class _SkipIter:
    def __init__(self, inner: Any, skip: int, before: Callable[[], None] | None) -> None:
        self._inner, self._skip, self._before, self._it = inner, skip, before, None

    def prime(self) -> None:
        """Start the inner sampler (it draws its seed now) and pass over the skipped items."""
        if self._it is None:
            if self._before is not None:
                self._before()
            self._it = iter(self._inner)
            for _ in range(self._skip):
                if next(self._it, _END) is _END:
                    break

    def __iter__(self) -> _SkipIter:
        return self

    def __next__(self) -> Any:
        self.prime()
        return next(self._it)


_END = object()


def _map_style(loader: Any) -> bool:
    torch = _torch()
    return (isinstance(loader, torch.utils.data.DataLoader) and callable(getattr(loader, "_get_iterator", None))
            and not isinstance(loader.dataset, torch.utils.data.IterableDataset))


def iter_from(loader: Any, skip: int, rng: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """``iter(loader)`` positioned after its first ``skip`` batches, with the generators put
    back to ``rng`` (from :func:`epoch_rng`) where that ``iter()`` started. The caller puts the
    global RNG back afterwards.

    A map-style ``DataLoader`` skips at the sampler: the iterator is built from a shallow copy
    of the loader whose (batch) sampler passes over ``skip`` index batches, so no skipped
    sample is loaded and the workers prefetch from the first batch that is used. Anything
    else (an ``IterableDataset``) is fetched and discarded. The iterator draws from the
    generators exactly as ``iter(loader)`` plus its first ``next()`` would.
    """
    reset = rng is not None and bool(rng.get("reset"))
    if rng is not None and (not reset or not _map_style(loader)):
        set_epoch_rng(loader, rng)  # the base seed and the sampler's seed, as they were drawn
    if skip <= 0 or not _map_style(loader):
        it = iter(loader)
        for _ in range(skip):
            if next(it, _END) is _END:
                break
        return it
    clone = copy.copy(loader)  # DataLoader refuses sampler assignment after __init__
    attr = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    # Persistent workers reused at that epoch drew no base seed: the sampler draws from `rng`.
    before = functools.partial(set_epoch_rng, loader, rng) if reset else None
    clone.__dict__[attr] = _Skip(getattr(loader, attr), skip, before)
    clone.__dict__["_iterator"] = None
    it = clone._get_iterator()
    it._index_sampler = loader._index_sampler  # a persistent worker's next epoch: the real one
    if loader.persistent_workers and loader.num_workers > 0:
        loader._iterator = it  # later epochs reuse these workers, as iter(loader) would
    sampler_iter = getattr(it, "_sampler_iter", None)
    if isinstance(sampler_iter, _SkipIter):
        sampler_iter.prime()  # one process: the seed draw happens here, not at the first fetch
    return it


def stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


# -- the custom-loop helper ---------------------------------------------------------------------
class Batches:
    """The batches of ``loader``, epoch after epoch, resumable exactly. Made by
    :meth:`spotckpt.Checkpointer.batches`; iterate it (it never ends) or call ``next()``.

    Attributes:
        epoch: the epoch of the last batch handed out (0-based).
        index: batches of that epoch handed out so far.
    """

    def __init__(self, loader: Any, *, own_loader_state: bool, saved: Mapping[str, Any] | None) -> None:
        self.loader = loader
        self.epoch, self.index = 0, 0
        self._delegate = stateful(loader)
        self._own_loader_state = own_loader_state and self._delegate
        self._rng: dict[str, Any] | None = None  # states at this epoch's iter()
        self._it: Iterator[Any] | None = None
        self._resume = False
        if saved:
            self.epoch, self.index, self._rng = int(saved["epoch"]), int(saved["index"]), saved.get("rng")
            if self._own_loader_state and saved.get("loader") is not None:
                loader.load_state_dict(saved["loader"])
            self._resume = self.index > 0

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"epoch": self.epoch, "index": self.index, "rng": self._rng}
        if self._own_loader_state:
            sd["loader"] = self.loader.state_dict()
        return sd

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        empty = 0
        while True:
            if self._it is None:
                self._start()
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:
                    empty += 1
                    if empty > 1:
                        raise RuntimeError("spotckpt: the loader yields no batches") from None
                self._it = None
                self.epoch, self.index, self._rng = self.epoch + 1, 0, None
                continue
            self.index += 1
            return batch

    def _start(self) -> None:
        torch = _torch()
        if not self._resume:
            if not self._delegate:
                self._rng = epoch_rng(self.loader)
            self._it = iter(self.loader)
            return
        self._resume = False
        now = torch.get_rng_state()  # as the checkpoint left it, or as the run since drew
        try:
            if self._delegate:
                self._it = iter(self.loader)  # resumes its own position
                return
            n = len(self.loader) if hasattr(self.loader, "__len__") else None
            if n is not None and self.index >= n:
                self._it = iter(())  # the epoch was finished: the next one starts now
                return
            assert self._rng is not None, "a mid-epoch Batches state always has the epoch's RNG"
            self._it = iter_from(self.loader, self.index, self._rng)
        finally:
            torch.set_rng_state(now)


class Registry:
    """The Checkpointer's :class:`Batches`, saved under :data:`KEY` by name."""

    def __init__(self) -> None:
        self.saved: Mapping[str, Any] = {}
        self.live: dict[str, Batches] = {}

    def make(self, loader: Any, name: str, user_state: Mapping[str, Any]) -> Batches:
        if name in self.live:
            raise ValueError(f"spotckpt: batches(name={name!r}) exists already; give each loader its own name")
        own = not any(v is loader for v in user_state.values())
        b = self.live[name] = Batches(loader, own_loader_state=own, saved=self.saved.get(name))
        return b

    def state_dict(self) -> dict[str, Any]:
        return {name: b.state_dict() for name, b in self.live.items()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.saved = dict(sd)
