"""Sharded state (DTensor: FSDP2, tensor parallel) through ``torch.distributed.checkpoint``.

Used when a state entry holds DTensors. Each rank's part of a step then holds:

- ``state.pt``: what is per rank or small (RNG states, the non-tensor leaves of the sharded
  entries such as the optimizer's ``param_groups``, the entries that are not sharded), written
  and read as for any other state (``torch.save``, ``weights_only`` loading);
- ``__<R>_0.distcp``: the tensors, written by DCP (each rank its shards; a replicated tensor
  by one rank only), and on rank 0 ``.metadata``, DCP's index of every rank's shards, written
  by the coordinator once all ranks wrote theirs. Its paths name the part dirs
  (``rank-<R>/__<R>_0.distcp``), so a step's remote dir ``step-N/`` is DCP's checkpoint dir.

Models go through ``get_model_state_dict``, optimizers through ``get_optimizer_state_dict``
(keyed by parameter names, not ids), so DCP's planner can load the step at any world size:
each rank reads the pieces of every saved rank's shards that make up its own. Nothing from the
checkpoint is unpickled except ``weights_only`` tensors and a ``.metadata`` restricted to
DCP's own classes: DCP's bytes items (``torch.load(weights_only=False)``) are never used.

Example:
    >>> codec = ShardedCodec(state, sharded_keys(state), group=io_group)  # doctest: +SKIP
    >>> payload = codec.snapshot(pool)          # training thread: CPU copies of the shards
    >>> entries = codec.write(tmpdir, payload)  # writer thread: collective on io_group
"""
from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from spotckpt._commit import FileEntry, file_digest, rank_dirname
from spotckpt._errors import ConfigError, CorruptCheckpointError

from . import _snapshot as _state

SERIALIZER = "dcp"
SHARDED_KEY = "__spotckpt_sharded__"  # in state.pt: entry -> its state dict, tensors as _SLOT
_SLOT = "\x00spotckpt-dcp-tensor\x00"
METADATA = ".metadata"


# -- which entries are sharded -------------------------------------------------------------
def _has_dtensor(obj: Any) -> bool:
    if isinstance(obj, nn.Module):
        return any(isinstance(t, DTensor) for t in (*obj.parameters(), *obj.buffers()))
    if isinstance(obj, torch.optim.Optimizer):
        return any(isinstance(p, DTensor) for g in obj.param_groups for p in g["params"])
    return isinstance(obj, DTensor)


def sharded_keys(state: Mapping[str, Any]) -> list[str]:
    """Entries of ``state`` that hold DTensors (a module, its optimizer)."""
    return [k for k, v in state.items() if _has_dtensor(v)]


def _model_of(state: Mapping[str, Any], key: str, opt: torch.optim.Optimizer) -> nn.Module:
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for v in state.values():
        if isinstance(v, nn.Module) and params <= {id(p) for p in v.parameters()}:
            return v
    raise ConfigError(f"spotckpt: state entry {key!r} is an optimizer over sharded parameters, and no "
                      "module in the state holds them all: put the model in the state too")


def _get(state: Mapping[str, Any], key: str) -> Any:
    obj = state[key]
    if isinstance(obj, nn.Module):
        return get_model_state_dict(obj)
    if isinstance(obj, torch.optim.Optimizer):
        return get_optimizer_state_dict(_model_of(state, key, obj), obj)
    if isinstance(obj, DTensor):
        return obj
    raise ConfigError(f"spotckpt: state entry {key!r} holds sharded tensors; spotckpt shards modules "
                      "and optimizers only")


def _unstepped(obj: Any) -> bool:
    """An optimizer before its first step: nothing to save. (``get_optimizer_state_dict``
    would initialise its state with a zero-gradient step, and Adam's step count would then
    be one ahead of an uninterrupted run's.)"""
    return isinstance(obj, torch.optim.Optimizer) and not obj.state


def _split(obj: Any, path: str, out: dict[str, Any], copy: Callable[[str, Any], Any]) -> Any:
    """``obj`` with every tensor replaced by ``_SLOT``; the tensors go to ``out[path]``."""
    if isinstance(obj, torch.Tensor):
        out[path] = copy(path, obj)
        return _SLOT
    if isinstance(obj, dict):
        return {k: _split(v, f"{path}/{k}", out, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_split(v, f"{path}/{i}", out, copy) for i, v in enumerate(obj))
    return _state.snapshot_value(obj)


def _slots(obj: Any, path: str, out: set[str]) -> None:
    """The paths of the tensors in a state dict saved by :func:`_split`."""
    if isinstance(obj, str) and obj == _SLOT:
        out.add(path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _slots(v, f"{path}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _slots(v, f"{path}/{i}", out)


def _join(obj: Any, path: str, tensors: Mapping[str, Any]) -> Any:
    if isinstance(obj, str) and obj == _SLOT:
        if path not in tensors:
            raise CorruptCheckpointError(f"spotckpt: sharded entry {path!r} is not in this job's state")
        return tensors[path]
    if isinstance(obj, dict):
        return {k: _join(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, f"{path}/{i}", tensors) for i, v in enumerate(obj))
    return obj


# -- save ------------------------------------------------------------------------------------
class _Writer(FileSystemWriter):
    """DCP's file writer; the coordinator's ``.metadata`` names each rank's part dir."""

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        results = [[dataclasses.replace(
            wr, storage_data=dataclasses.replace(
                wr.storage_data, relative_path=f"{rank_dirname(r)}/{wr.storage_data.relative_path}"))
            for wr in rank_results] for r, rank_results in enumerate(results)]
        super().finish(metadata, results)


class ShardedCodec:
    """Snapshot and write a state whose ``keys`` are sharded.

    Args:
        group: a process group of all ranks used for nothing else: :meth:`write` runs DCP's
            collectives on it from the writer thread while training goes on.
    """

    serializer = SERIALIZER

    def __init__(self, state: Mapping[str, Any], keys: list[str], *, group: Any) -> None:
        self.state, self.keys, self.group = state, keys, group

    def snapshot(self, pool: _state.SnapshotPool) -> dict[str, Any]:
        """CPU copies of the shards (into ``pool``'s buffers), the rest as plain state."""
        tensors: dict[str, Any] = {}

        def copy(path: str, t: Any) -> Any:
            if isinstance(t, DTensor):  # this rank's shard, as a DTensor over CPU memory
                local = pool.tensor(("dcp", path), t.to_local())
                return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                          shape=t.shape, stride=t.stride())
            return pool.tensor(("dcp", path), t)

        pool.begin()
        try:
            plain = {k: v for k, v in self.state.items() if k not in self.keys}
            payload = {}
            for k, v in plain.items():
                sd = getattr(v, "state_dict", None)
                payload[k] = _state.snapshot_value(sd() if callable(sd) else v, pool, (repr(k),))
            payload[SHARDED_KEY] = {k: None if _unstepped(self.state[k]) else
                                    _split(_get(self.state, k), k, tensors, copy) for k in self.keys}
        finally:
            pool.end()
        payload[_state.RNG_KEY] = _state.rng_state()
        return {"plain": payload, "tensors": tensors}

    def stream(self, serializer: str) -> list[str]:
        return []  # the parts are uploaded after the local commit

    def write(self, tmpdir: Path, payload: Mapping[str, Any], serializer: str = SERIALIZER,
              ready: Callable[[str, int], None] | None = None) -> list[FileEntry]:
        entries = _state.write_state(tmpdir, payload["plain"], "torch", ready=ready)
        dcp.save(payload["tensors"], storage_writer=_Writer(tmpdir), process_group=self.group)
        for p in sorted(tmpdir.iterdir()):
            if p.name.endswith(".distcp") or p.name == METADATA:
                entries.append(FileEntry(p.name, p.stat().st_size, file_digest(p)))
        return entries


# -- load ------------------------------------------------------------------------------------
_META_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_META_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                 ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")} | {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str",
                              "bytes", "bool", "slice")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles ``.metadata``; this admits DCP's metadata classes and plain values only."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _META_MODULES or (module, name) in _META_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"spotckpt: refusing to load {module}.{name} from a DCP .metadata")


class _Reader(FileSystemReader):
    """Reads a step laid out as ``<dir>/rank-<R>/...`` with rank 0's ``.metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / rank_dirname(0) / METADATA
        try:
            md = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise CorruptCheckpointError(f"spotckpt: cannot load {path}: {e}") from e
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def plain_part(rank: int, saved_world: int) -> str:
    """The part dir whose plain values this rank loads: its own, or rank 0's (a rank the
    saved step did not have)."""
    return rank_dirname(rank if rank < saved_world else 0)


def _targets(state: Mapping[str, Any], saved_sharded: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The sharded entries to load and the tensors they load into (this job's own shapes and
    shardings), those the step saved only (:func:`_join` names any saved one missing)."""
    keys = [k for k in state if saved_sharded.get(k) is not None]  # (None: an unstepped optimizer)
    targets: dict[str, Any] = {}
    for k in keys:
        _split(_get(state, k), k, targets, lambda _p, t: t)
    saved: set[str] = set()
    for k in keys:
        _slots(saved_sharded[k], k, saved)
    return keys, {p: t for p, t in targets.items() if p in saved}


def shard_files(state: Mapping[str, Any], tree: Path, rank: int, saved_world: int) -> set[str]:
    """The files (paths under ``tree``, ``rank-<R>/__<R>_0.distcp``) holding the pieces of
    the saved shards this rank loads, from DCP's own load planner over ``.metadata`` and this
    rank's plain part (both already in ``tree``): what it must download, not the whole step
    (issue 25). Local: no collective.

    Raises:
        CorruptCheckpointError: ``.metadata`` cannot be read or names no file for a piece.
    """
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    plain = _state.read_state(tree / plain_part(rank, saved_world), "torch")
    _keys, targets = _targets(state, plain.get(SHARDED_KEY, {}))
    md = _Reader(tree).read_metadata()
    planner = DefaultLoadPlanner()
    planner.set_up_planner(targets, md, False)
    try:
        return {str(md.storage_data[item.storage_index].relative_path)
                for item in planner.create_local_plan().items}
    except (KeyError, AttributeError, TypeError) as e:
        raise CorruptCheckpointError(f"spotckpt: {tree / rank_dirname(0) / METADATA} names no file "
                                     f"for a piece of the state: {e}") from e


def load(state: dict[str, Any], tree: Path, rank: int, saved_world: int, *, group: Any) -> list[str]:
    """Load a step from ``tree`` (every saved rank's part under ``rank-<R>/``, verified) into
    ``state``, resharding the sharded entries to this job's world size. Collective on ``group``.

    This rank's plain part is its own when the step had a rank ``rank``; otherwise rank 0's,
    without its RNG states (they stay as the script seeded them).

    Returns:
        The state's keys the checkpoint did not have.
    """
    own = rank < saved_world
    plain = _state.read_state(tree / plain_part(rank, saved_world), "torch")
    if not own:
        plain.pop(_state.RNG_KEY, None)
    saved_sharded: dict[str, Any] = plain.pop(SHARDED_KEY, {})
    keys, targets = _targets(state, saved_sharded)
    dcp.load(targets, storage_reader=_Reader(tree), process_group=group)
    for k in keys:
        sd = _join(saved_sharded[k], k, targets)
        obj = state[k]
        if isinstance(obj, nn.Module):
            set_model_state_dict(obj, sd)
        elif isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_model_of(state, k, obj), obj, sd)
        else:
            obj.copy_(sd)
    rest = {k: v for k, v in state.items() if k not in saved_sharded}
    missing = _state.apply(rest, plain)
    state.update(rest)  # plain values replaced in place
    return missing
