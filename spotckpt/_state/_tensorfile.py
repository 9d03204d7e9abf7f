"""The ``safetensors`` payload: tensor bytes written raw, in one pass, and read back raw.

Format layer, torch only. ``torch.save`` spent most of a save's CPU on its zip CRC-32 and
copied every record; the file was then read back for its XXH3 (bench/). Here the bytes go
from the snapshot's buffers to the file once, and XXH3 is updated on the same bytes as they
pass, block by block while they are in the CPU's cache: one read of memory, one checksum
(the manifest's).

The file is in the `safetensors <https://huggingface.co/docs/safetensors>`_ layout, so
``safetensors.safe_open(path, "pt")`` opens a checkpoint: an 8-byte little-endian header
length, a JSON header (``dtype``/``shape``/``data_offsets`` per tensor, ``__metadata__`` a
str->str map), then the raw little-endian bytes. The header is known from shapes and dtypes
before the first byte is written, so the file is written strictly front to back (and may be
uploaded as it is written). Everything that is not a plain CPU tensor of a dtype the layout
has (the nested structure, numbers, strings, numpy arrays, RNG states, a complex or
quantized tensor) is one more ``U8`` entry, :data:`VALUES`, in today's safe encoding
(``torch.save``, loaded with ``weights_only``), each tensor replaced by a tagged reference
that records its dtype and shape again (the header and the state must agree).

Reading never unpickles tensor data: each tensor is read into fresh memory, the file's XXH3
is computed over what was read, and nothing is returned unless it matches the manifest's.
A header that is truncated, lies about sizes, overlaps or leaves gaps, names an unknown
dtype or disagrees with the references is refused with one line naming the file
(:class:`CorruptCheckpointError`; a start then falls back to the previous checkpoint).
"""
from __future__ import annotations

import collections
import ctypes
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from spotckpt._commit import FileEntry, hasher
from spotckpt._errors import CorruptCheckpointError

from ._values import TAG

NAME = "state.safetensors"
SERIALIZER = "safetensors"
VALUES = "__spotckpt_values__"  # the U8 entry holding the non-tensor part
REF = "st"                      # {TAG: REF, "k": name}: the tensor ``name`` of this file
_BLOCK = 1 << 20                # bytes hashed then written at a time (stays in cache between)
_MAX_HEADER = 100 << 20         # safetensors' own limit
_ALIGN = 8


def _torch() -> Any:
    return sys.modules["torch"]


def dtypes() -> dict[Any, str]:
    """torch dtype -> safetensors dtype name, for those both have."""
    torch = _torch()
    names = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
             "uint16": "U16", "uint32": "U32", "uint64": "U64",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
    return {getattr(torch, k): v for k, v in names.items() if hasattr(torch, k)}


def usable() -> bool:
    """Whether this process writes the format (torch imported, a little-endian machine)."""
    return "torch" in sys.modules and sys.byteorder == "little"


def _raw(t: Any) -> Any:
    """A writable byte view of contiguous CPU tensor ``t``'s memory (no copy; ``t`` must
    outlive it)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _raw_tensor(torch: Any, obj: Any, kinds: dict) -> bool:
    return (type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu"
            and obj.layout == torch.strided and not obj.is_quantized and not obj.is_nested
            and not obj.is_neg() and not obj.is_conj() and obj.dtype in kinds)


def split(payload: Any) -> tuple[Any, dict[str, Any]]:
    """``payload`` with each raw-writable tensor replaced by a reference, and the tensors by
    name (names follow their place in the state: ``model/fc.weight``)."""
    torch, kinds = _torch(), dtypes()
    tensors: dict[str, Any] = {}

    def walk(obj: Any, path: str) -> Any:
        t = type(obj)
        if _raw_tensor(torch, obj, kinds):
            name = path or "tensor"
            if name in tensors or name == VALUES or name == "__metadata__":
                name = f"{name}#{len(tensors)}"
            tensors[name] = obj if obj.is_contiguous() else obj.contiguous()
            # dtype and shape twice, here and in the header: a header that lies is caught
            return {TAG: REF, "k": name, "dtype": kinds[obj.dtype], "shape": list(obj.shape)}
        if t is dict or t is collections.OrderedDict:
            out = t()
            for k, v in obj.items():
                out[k] = walk(v, f"{path}/{k}" if path else str(k))
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                out._metadata = meta
            return out
        if t is list:
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if t is tuple:
            return tuple(walk(v, f"{path}/{i}") for i, v in enumerate(obj))
        return obj
    return walk(payload, ""), tensors


def write(tmpdir: Path, payload: Any, values_dump: Callable[[Any, Any], None],
          ready: Callable[..., Any] | None = None) -> list[FileEntry]:
    """Write ``payload`` as :data:`NAME` into ``tmpdir`` (fsynced) and return its entry.

    ``values_dump(obj, fileobj)`` writes the non-tensor part (``torch.save``). ``ready(name,
    size, buffers)`` is called before the first byte is written (an upload may send the
    buffers meanwhile; it returns None or a ``release()``, called before this returns), and
    ``ready(name, size)`` once the bytes are in the file, before the fsync."""
    rest, tensors = split(payload)
    buf = io.BytesIO()
    values_dump(rest, buf)
    kinds = dtypes()
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # aligned for zero-copy readers
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "spotckpt"}}
    blocks: list[Any] = []
    off = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": kinds[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        blocks.append(_raw(t))
        off += n
    vals = buf.getbuffer()
    header[VALUES] = {"dtype": "U8", "shape": [len(vals)], "data_offsets": [off, off + len(vals)]}
    blocks.append(vals)
    off += len(vals)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % _ALIGN)
    prefix = len(head).to_bytes(8, "little") + head
    size = len(prefix) + off
    h = hasher()
    path = tmpdir / NAME
    # The upload (a stream, if one was started) sends these very buffers, beside this write.
    release = ready(NAME, size, [prefix, *blocks]) if ready is not None else None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _put(fd, memoryview(prefix), h)
            for b in blocks:
                for i in range(0, len(b), _BLOCK):
                    _put(fd, b[i:i + _BLOCK], h)
            if ready is not None:
                ready(NAME, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if release is not None:
            release()  # waits for the parts being sent from the buffers: they may change next
        vals.release()
    return [FileEntry(NAME, size, h.hexdigest())]


def _put(fd: int, view: memoryview, h: Any) -> None:
    h.update(view)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- reading ------------------------------------------------------------------------------
def _bad(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"spotckpt: {path} is not a valid checkpoint: {why}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("a name appears twice in the header")
    return d


def parse_header(path: Path, head: bytes, size: int) -> list[tuple[str, Any, list[int], int, int]]:
    """The entries of a header (``(name, torch dtype, shape, begin, end)`` by offset),
    checked against the file's ``size``: every byte after the header belongs to exactly one
    entry and every entry's length is its shape times its dtype's size."""
    kinds = {v: k for k, v in dtypes().items()}
    try:
        header = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"its header is not JSON ({e})"[:200]) from None
    if type(header) is not dict:
        raise _bad(path, "its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if type(meta) is not dict or not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise _bad(path, "__metadata__ is not a map of strings")
    out = []
    for name, info in header.items():
        if type(info) is not dict or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"entry {name!r} is not dtype/shape/data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in kinds:
            raise _bad(path, f"entry {name!r} has dtype {dt!r}, which spotckpt does not read")
        if type(shape) is not list or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
            raise _bad(path, f"entry {name!r} has shape {shape!r}")
        if type(offs) is not list or len(offs) != 2 or not all(type(o) is int and o >= 0 for o in offs):
            raise _bad(path, f"entry {name!r} has data_offsets {offs!r}")
        item = _torch().empty((), dtype=kinds[dt]).element_size()
        if offs[1] - offs[0] != math.prod(shape) * item:
            raise _bad(path, f"entry {name!r}: {dt}{shape} is {math.prod(shape) * item} bytes, "
                             f"its offsets span {offs[1] - offs[0]}")
        out.append((name, kinds[dt], shape, offs[0], offs[1]))
    out.sort(key=lambda e: (e[3], e[4]))
    data = size - 8 - len(head)
    pos = 0
    for name, _, _, begin, end in out:
        if begin != pos:
            raise _bad(path, f"entry {name!r} starts at {begin}, expected {pos} (overlap or gap)")
        pos = end
    if pos != data:
        raise _bad(path, f"its entries end at {pos}, the data is {data} bytes")
    return out


def read(path: Path, digest: str | None, algo: str, values_load: Callable[[Any], Any]) -> Any:
    """The payload of :data:`NAME` at ``path``; its XXH3 must be ``digest`` (if given)
    before anything is returned. ``values_load(fileobj)`` loads the non-tensor part."""
    torch = _torch()
    h = hasher(algo)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size

        def exact(view: memoryview, what: str) -> None:
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise _bad(path, f"it ends inside {what}")
                got += n
            h.update(view)
        pre = bytearray(8)
        exact(memoryview(pre), "the header length")
        n = int.from_bytes(pre, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise _bad(path, f"its header length {n} is past the end ({size} bytes)")
        head = bytearray(n)
        exact(memoryview(head), "the header")
        entries = parse_header(path, bytes(head), size)
        tensors: dict[str, Any] = {}
        for name, dt, shape, begin, end in entries:
            if name == VALUES:
                if dt != torch.uint8 or len(shape) != 1:
                    raise _bad(path, f"its {VALUES} entry is not a U8 vector")
                vals = bytearray(end - begin)
                exact(memoryview(vals), name)
                continue
            t = torch.empty(shape, dtype=dt)
            raw = _raw(t)
            for i in range(0, len(raw), _BLOCK):
                exact(raw[i:i + _BLOCK], repr(name))
            tensors[name] = t
    if digest is not None and h.hexdigest() != digest:
        raise CorruptCheckpointError(f"spotckpt: {path} fails its checksum")
    if VALUES not in {e[0] for e in entries}:
        raise _bad(path, f"it has no {VALUES} entry")
    return join(path, values_load(io.BytesIO(vals)), tensors)


def join(path: Path, rest: Any, tensors: dict[str, Any]) -> Any:
    """Put the tensors back where ``rest`` references them: each exactly once, with the
    dtype and shape the reference recorded."""
    used: set[str] = set()
    kinds = dtypes()

    def walk(obj: Any) -> Any:
        t = type(obj)
        if isinstance(obj, dict):
            if obj.get(TAG) == REF and t is dict:
                name = obj.get("k")
                if set(obj) != {TAG, "k", "dtype", "shape"} or type(name) is not str or name not in tensors \
                        or name in used or obj["dtype"] != kinds[tensors[name].dtype] \
                        or obj["shape"] != list(tensors[name].shape):
                    raise _bad(path, f"the state's reference to tensor {name!r} does not match the header")
                used.add(name)
                return tensors[name]
            for k, v in obj.items():
                new = walk(v)
                if new is not v:
                    obj[k] = new
            return obj
        if t is list:
            for i, v in enumerate(obj):
                new = walk(v)
                if new is not v:
                    obj[i] = new
            return obj
        if t is tuple:
            return tuple(walk(v) for v in obj)
        return obj
    out = walk(rest)
    if used != set(tensors):
        raise _bad(path, f"tensors {sorted(set(tensors) - used)[:3]} are in the header but not in the state")
    return out
