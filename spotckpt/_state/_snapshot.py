"""Training state: CPU snapshots, serialisation and loading.

The training thread only calls :func:`snapshot` (tensors copied to CPU memory); writing
happens in the background. The serialisers:

- ``safetensors`` (:mod:`._tensorfile`): tensors written raw in one pass into a file that
  ``safetensors.safe_open`` opens, the rest in ``torch.save``'s encoding inside it. Used
  whenever torch is imported by the user.
- ``torch``: ``torch.save``; loaded with ``torch.load(weights_only=True)``, so no unpickling
  can run code. Written by earlier versions (still restored) and for DCP's per-rank part.
- ``pickle-safe``: pickle written, and read back with an unpickler that only admits plain
  containers, numbers, strings, bytes and numpy arrays. For users without torch (XGBoost).

All load plain values only: :func:`snapshot` encodes the other values a state commonly holds
(``deque``, ``defaultdict``, ``datetime``, dataclasses, ...) into plain ones and refuses the
rest at the save; :func:`read_state` rebuilds them (:mod:`spotckpt._state._values_decode`).
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import random
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from spotckpt._commit import FileEntry, file_digest
from spotckpt._errors import CorruptCheckpointError

from . import _tensorfile, _values
from ._values_decode import decode

RNG_KEY = "__spotckpt_rng__"


def _torch() -> Any:
    return sys.modules.get("torch")


def serializer_name() -> str:
    """What new checkpoints are written with: ``safetensors`` (:mod:`._tensorfile`) where torch
    is imported, else ``pickle-safe``. (``torch``, one ``torch.save`` file, is what earlier
    versions wrote and DCP's per-rank part still is: it restores as before.)"""
    if _torch() is None:
        return "pickle-safe"
    return _tensorfile.SERIALIZER if _tensorfile.usable() else "torch"


class SnapshotPool:
    """CPU buffers reused from one snapshot to the next.

    Copying into memory that is already allocated and touched is a plain memcpy; copying into
    fresh memory also pays a page fault per 4 KiB page, which on a VM made a 1 GiB snapshot
    up to 40x slower (bench/, BENCHMARKS.md). So the training thread copies each tensor or
    array into the buffer it used last time (same name, shape, dtype), allocating only what
    changed. GPU tensors go to pinned buffers. The pool holds one CPU copy of the state
    between saves; a buffer may be refilled only after the previous snapshot was written
    (the Checkpointer waits for its writer before each snapshot).

    Example:
        >>> pool = SnapshotPool()
        >>> payload = snapshot({"w": [1.0, 2.0]}, pool=pool)
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple, Any] = {}
        self._used: set[tuple] = set()
        self._cuda = False

    def begin(self) -> None:
        self._used = set()
        self._cuda = False

    def end(self) -> None:
        for key in [k for k in self._bufs if k not in self._used]:
            del self._bufs[key]  # entries gone from the state: free their memory
        if self._cuda:
            _torch().cuda.synchronize()  # the writer thread reads the pinned buffers next

    def tensor(self, key: tuple, t: Any) -> Any:
        torch = _torch()
        src = t.detach()
        buf = self._bufs.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            pin = src.is_cuda and torch.cuda.is_available()
            buf = torch.empty_like(src, device="cpu", pin_memory=pin)
            self._bufs[key] = buf
        self._used.add(key)
        self._cuda = self._cuda or src.is_cuda
        buf.copy_(src, non_blocking=src.is_cuda)
        return buf

    def array(self, key: tuple, a: Any) -> Any:
        np = sys.modules["numpy"]
        buf = self._bufs.get(key)
        if buf is None or buf.shape != a.shape or buf.dtype != a.dtype or not isinstance(buf, np.ndarray):
            buf = self._bufs[key] = np.empty_like(a)
        self._used.add(key)
        np.copyto(buf, a)
        return buf


def _poolable_tensor(torch: Any, t: Any) -> bool:
    return (t.layout == torch.strided and not t.is_quantized and t.device.type != "meta"
            and not t.is_nested and type(t) in (torch.Tensor, torch.nn.Parameter))


def snapshot_value(obj: Any, pool: SnapshotPool | None = None, key: tuple = ()) -> Any:
    """A deep CPU copy of ``obj`` that later training steps cannot change (into ``pool``'s
    buffers where given: ``key`` names the value's place in the state), encoded into plain
    values that both serialisers load (:mod:`spotckpt._state._values`).

    Raises:
        UnsupportedStateError: ``obj`` holds a value that could not be restored.
    """
    return _values.encode(obj, key, _copy if pool is None else functools.partial(_pooled, pool))


def _copy(obj: Any, key: tuple) -> Any:
    """A tensor or a numeric numpy array, copied to fresh CPU memory."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    return obj.copy()


def _pooled(pool: SnapshotPool, obj: Any, key: tuple) -> Any:
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return pool.tensor(key, obj) if _poolable_tensor(torch, obj) else _copy(obj, key)
    return pool.array(key, obj)


def snapshot(state: Mapping[str, Any], pool: SnapshotPool | None = None) -> dict[str, Any]:
    """Snapshot every entry of ``state`` (``state_dict()`` where there is one) and the RNGs.

    Args:
        pool: reuse this pool's CPU buffers (see :class:`SnapshotPool`); the result is
            valid until the next snapshot into the same pool.
    """
    if pool is not None:
        pool.begin()
    out: dict[str, Any] = {}
    try:
        for key, obj in state.items():
            sd = getattr(obj, "state_dict", None)
            out[key] = snapshot_value(sd() if callable(sd) else obj, pool, (repr(key),))
    finally:
        if pool is not None:
            pool.end()
    out[RNG_KEY] = rng_state()
    return out


def apply(state: dict[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """Load ``saved`` into ``state`` in place. Returns keys the checkpoint did not have."""
    missing = []
    for key, obj in list(state.items()):
        if key not in saved:
            if not key.startswith("__spotckpt"):  # spotckpt's own entries are optional
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


class PlainCodec:
    """The state as one file (:func:`write_state`), uploaded while it is written.

    (``_dcp.ShardedCodec`` has the same methods, for a sharded state.)
    """

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state

    @property
    def serializer(self) -> str:
        return serializer_name()

    def snapshot(self, pool: SnapshotPool | None = None) -> dict[str, Any]:
        return snapshot(self.state, pool=pool)

    def stream(self, serializer: str) -> list[str]:
        return [payload_name(serializer)]

    def write(self, tmpdir: Path, payload: Any, serializer: str,
              ready: Callable[[str, int], None] | None = None) -> list[FileEntry]:
        return write_state(tmpdir, payload, serializer, ready=ready)


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
def payload_name(serializer: str) -> str:
    """The file :func:`write_state` writes for ``serializer``. It is written strictly front to
    back (``torch.save`` and ``pickle.dump`` into an open file never seek), so it may be
    uploaded while it is being written (``Engine.commit(stream=...)``)."""
    if serializer == _tensorfile.SERIALIZER:
        return _tensorfile.NAME
    return "state.pt" if serializer == "torch" else "state.pkl"


def write_state(tmpdir: Path, payload: Any, serializer: str,
                ready: Callable[[str, int], None] | None = None) -> list[FileEntry]:
    """Serialise ``payload`` into ``tmpdir``, fsync, checksum, and return its entries.

    ``torch.save`` gets the real file: handed a Python wrapper instead, it copies every
    record into a new bytes object, which cost 3x the CPU of the save itself (bench/). The
    checksum then reads the file back from the page cache while another thread waits for
    the fsync, so the disk flush and the hashing overlap. ``ready(name, size)`` is called as
    soon as the bytes are in the file, before both, so a streamed upload can finish meanwhile.
    """
    if serializer == _tensorfile.SERIALIZER:
        return _tensorfile.write(tmpdir, payload, _torch().save, ready=ready)
    name = payload_name(serializer)
    path = tmpdir / name
    with open(path, "wb") as f:
        if serializer == "torch":
            _torch().save(payload, f)
        else:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        size = f.tell()
        if ready is not None:
            ready(name, size)
        if size < (8 << 20):
            os.fsync(f.fileno())
            digest = file_digest(path)
        else:
            err: list[BaseException] = []

            def sync() -> None:
                try:
                    os.fsync(f.fileno())
                except BaseException as e:  # noqa: BLE001 - raised below
                    err.append(e)

            t = threading.Thread(target=sync, name="spotckpt-fsync")
            t.start()
            try:
                digest = file_digest(path)
            finally:
                t.join()
            if err:
                raise err[0]
    return [FileEntry(name, size, digest)]


_SAFE_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                              "str", "bytes", "bytearray", "bool", "slice", "range")
} | {("collections", "OrderedDict"), ("numpy", "ndarray"), ("numpy", "dtype"),
     ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
     ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
     # pickle protocol 5 writes a contiguous array as _frombuffer(bytes, dtype, shape, order)
     ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
     ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "numpy" and name.endswith("DType")) or \
                (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"spotckpt: refusing to load {module}.{name} from a checkpoint")


def _torch_safe_globals() -> list[Any]:
    """What ``weights_only`` loading must also admit for the plain values a state may hold
    and the pickle-safe reader admits: without it, a state with a numpy array or scalar, a
    frozenset, a range, a slice or ``b""`` saved fine and then could never be restored."""
    import _codecs

    out: list[Any] = [bytes, bytearray, set, frozenset, complex, range, slice, _codecs.encode]
    try:
        import numpy as np
    except ImportError:
        return out
    core = getattr(np, "_core", None) or np.core
    out += [(core.multiarray._reconstruct, f"{core.__name__}.multiarray._reconstruct"),
            (core.multiarray.scalar, f"{core.__name__}.multiarray.scalar"), np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
    return out


def read_state(ckpt_dir: Path, serializer: str, manifest: Any = None) -> Any:
    """Load a payload written by :func:`write_state` without running code from it, and
    rebuild the values :func:`snapshot` encoded (:mod:`spotckpt._state._values_decode`).

    Args:
        manifest: the checkpoint's; a ``safetensors`` payload is checked against its
            checksum as it is read (nothing is returned from bytes that do not match).

    Raises:
        CorruptCheckpointError: the file cannot be loaded safely.
        UnsupportedStateError: it holds a user class that is not imported.
    """
    try:
        return decode(_load(ckpt_dir, serializer, manifest))
    except RecursionError as e:
        raise CorruptCheckpointError(f"spotckpt: cannot load {ckpt_dir}: nested too deeply") from e


def _torch_load(f: Any) -> Any:
    torch = _torch()
    if torch is None:
        import torch  # noqa: F811 - the checkpoint was written by torch
    with torch.serialization.safe_globals(_torch_safe_globals()):
        return torch.load(f, map_location="cpu", weights_only=True)


def _load(ckpt_dir: Path, serializer: str, manifest: Any = None) -> Any:
    try:
        if serializer == _tensorfile.SERIALIZER:
            if _torch() is None:
                import torch  # noqa: F401 - the checkpoint was written by torch
            e = next((e for e in getattr(manifest, "files", ()) if e.path == _tensorfile.NAME), None)
            return _tensorfile.read(ckpt_dir / _tensorfile.NAME, e and e.digest, e.algo if e else "xxh3_128",
                                    _torch_load)
        if serializer == "torch":
            return _torch_load(ckpt_dir / "state.pt")
        if serializer == "pickle-safe":
            with open(ckpt_dir / "state.pkl", "rb") as f:
                return _SafeUnpickler(io.BufferedReader(f)).load()
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # torch's first line only says that loading failed; the type is further down
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it holds a {m.group(1)}, which a checkpoint may not hold" if m else str(e)
        raise CorruptCheckpointError(f"spotckpt: cannot load {ckpt_dir}: {why}".splitlines()[0]) from e
    raise CorruptCheckpointError(f"spotckpt: {ckpt_dir}: unknown serializer {serializer!r}")
