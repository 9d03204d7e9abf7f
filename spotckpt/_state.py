"""Training state: CPU snapshots, serialisation and loading.

The training thread only calls :func:`snapshot` (tensors copied to CPU memory); writing
happens in the background. Two serialisers:

- ``torch``: ``torch.save``; loaded with ``torch.load(weights_only=True)``. Used whenever torch
  is imported by the user, so no unpickling can run code.
- ``pickle-safe``: pickle written, and read back with an unpickler that only admits plain
  containers, numbers, strings, bytes and numpy arrays. For users without torch (XGBoost).
"""
from __future__ import annotations

import collections
import copy
import io
import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any, Mapping

from ._errors import CorruptCheckpointError
from ._manifest import FileEntry, HashingWriter

RNG_KEY = "__spotckpt_rng__"


def _torch() -> Any:
    return sys.modules.get("torch")


def serializer_name() -> str:
    return "torch" if _torch() is not None else "pickle-safe"


def snapshot_value(obj: Any) -> Any:
    """A deep CPU copy of ``obj`` that later training steps cannot change."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = snapshot_value(v)
        meta = getattr(obj, "_metadata", None)  # nn.Module.state_dict() versions
        if meta is not None:
            out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(snapshot_value(v) for v in obj)
    if isinstance(obj, (int, float, str, bytes, bool, type(None))):
        return obj
    return copy.deepcopy(obj)


def snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    """Snapshot every entry of ``state`` (``state_dict()`` where there is one) and the RNGs."""
    out: dict[str, Any] = {}
    for key, obj in state.items():
        sd = getattr(obj, "state_dict", None)
        out[key] = snapshot_value(sd() if callable(sd) else obj)
    out[RNG_KEY] = rng_state()
    return out


def apply(state: dict[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """Load ``saved`` into ``state`` in place. Returns keys the checkpoint did not have."""
    missing = []
    for key, obj in list(state.items()):
        if key not in saved:
            missing.append(key)
            continue
        load = getattr(obj, "load_state_dict", None)
        if callable(load):
            load(saved[key])
        else:
            state[key] = saved[key]
    if RNG_KEY in saved:
        set_rng_state(saved[RNG_KEY])
    return missing


# -- RNG ---------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy (if imported) and torch (if imported) global RNG states, in types that
    ``weights_only`` loading admits."""
    st: dict[str, Any] = {"python": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = (str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    torch = _torch()
    if torch is not None:
        st["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Mapping[str, Any]) -> None:
    if "python" in st:
        v = st["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in st:
        kind, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch = _torch()
    if torch is not None and "torch" in st:
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])


# -- files -------------------------------------------------------------------------------
def write_state(tmpdir: Path, payload: Any, serializer: str) -> list[FileEntry]:
    """Serialise ``payload`` into ``tmpdir`` (hashing as it writes), fsync, and return entries."""
    name = "state.pt" if serializer == "torch" else "state.pkl"
    path = tmpdir / name
    with open(path, "wb") as f:
        hw = HashingWriter(f)
        if serializer == "torch":
            _torch().save(payload, hw)
        else:
            pickle.dump(payload, hw, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    return [FileEntry(name, hw.size, hw.hexdigest())]


_SAFE_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                              "str", "bytes", "bytearray", "bool", "slice", "range")
} | {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
     ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
     ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
     ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "numpy" and name.endswith("DType")) or \
                (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"spotckpt: refusing to load {module}.{name} from a checkpoint")


def read_state(ckpt_dir: Path, serializer: str) -> Any:
    """Load a payload written by :func:`write_state` without running code from it.

    Raises:
        CorruptCheckpointError: the file cannot be loaded safely.
    """
    try:
        if serializer == "torch":
            torch = _torch()
            if torch is None:
                import torch  # noqa: F811 - the checkpoint was written by torch
            return torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
        if serializer == "pickle-safe":
            with open(ckpt_dir / "state.pkl", "rb") as f:
                return _SafeUnpickler(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CorruptCheckpointError(f"spotckpt: cannot load {ckpt_dir}: {e}".splitlines()[0]) from e
    raise CorruptCheckpointError(f"spotckpt: {ckpt_dir}: unknown serializer {serializer!r}")
