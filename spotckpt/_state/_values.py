"""The values a training state may hold, and how they cross a checkpoint.

Both serialisers load only plain values (``torch.load(weights_only=True)``, and the
``pickle-safe`` unpickler), so no checkpoint can run code. A state holds more than that:
a ``deque`` of recent losses, a ``defaultdict`` of counts, a ``datetime``, a ``Path``, a
dataclass of settings, an ``Enum`` phase, a numpy ``Generator``. :func:`encode` turns each
of these into a tagged dict of plain values at snapshot time and :func:`decode` rebuilds it
at restore, so it comes back with its type. Anything else is refused at the first save with
one line naming its place in the state and its type (it used to save fine and then fail at
every restart).

User classes (dataclasses, namedtuples, ``Enum``) are found again by module and qualified
name, only among modules already imported (a checkpoint never makes Python import
anything), and only if the class found is of the same kind. They are rebuilt the way pickle
rebuilds plain objects, without calling ``__init__``: dataclass fields and namedtuple items
are set, ``Enum`` members are looked up by name. Classes that customise pickling
(``__reduce__``, ``__getstate__``) are refused at save: their state is not their fields.

The rebuilding half is :mod:`spotckpt._state._values_decode`.

Example:
    >>> import collections
    >>> from spotckpt._state._values_decode import decode
    >>> decode(encode({"recent": collections.deque([1, 2], maxlen=5)}))
    {'recent': deque([1, 2], maxlen=5)}
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import enum
import fractions
import pathlib
import random
import sys
import types
import uuid
from typing import Any, Callable

from spotckpt._errors import UnsupportedStateError

TAG = "__spotckpt_type__"
_SCALARS = frozenset({int, float, bool, str, bytes, complex, type(None), range})
_FACTORIES: dict[str, Any] = {f.__name__: f for f in (
    list, dict, set, frozenset, tuple, int, float, str, bytes, bool, complex,
    collections.Counter, collections.OrderedDict, collections.deque)}
_FACTORIES["None"] = None
_PATHS = {c.__name__: c for c in (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                                  pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath)}
_BITGENS = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")
Leaf = Callable[[Any, tuple], Any]


def render(key: tuple) -> str:
    """``("'sched'", "'history'", 3, ".lr")`` -> ``state['sched']['history'][3].lr``."""
    out = "state"
    for p in key:
        out += f"[{p}]" if isinstance(p, int) or not p.startswith((".", " ")) else p
    return out


def _copy_leaf(obj: Any, key: tuple) -> Any:
    return obj.copy() if hasattr(obj, "copy") else obj.detach().to("cpu", copy=True)


def _tagged(kind: str, **fields: Any) -> dict[str, Any]:
    return {TAG: kind, **fields}


def _refuse(obj: Any, key: tuple, why: str = "") -> UnsupportedStateError:
    t = type(obj)
    return UnsupportedStateError(
        f"spotckpt: cannot checkpoint {render(key)}: {t.__module__}.{t.__qualname__} "
        f"{why or 'is not a value spotckpt can restore'}; store plain values, tensors, arrays or "
        "the types listed in the docs (docs/guides/custom-loop.md, What a state may hold), or give its owner "
        "state_dict()/load_state_dict() at the top level of the state")


def _plain_key(k: Any) -> bool:
    t = type(k)
    if t in _SCALARS:
        return True
    if t is tuple or t is frozenset:
        return all(_plain_key(e) for e in k)
    np = sys.modules.get("numpy")
    return np is not None and isinstance(k, np.generic) and not k.dtype.hasobject


def _pairs(items: Any, key: tuple, leaf: Leaf) -> list[list[Any]]:
    return [[encode(k, key + (f" (key {k!r})",), leaf), encode(v, key + (repr(k),), leaf)]
            for k, v in items]


def _class_path(obj: Any, key: tuple, kind: str) -> list[str]:
    t = type(obj)
    if _find(t.__module__, t.__qualname__) is not t:
        raise _refuse(obj, key, f"is a {kind} that cannot be found again by its name (defined "
                                "inside a function, or shadowed); define it at module level")
    return [t.__module__, t.__qualname__]


def _plain_pickling(t: type, base: type) -> bool:
    custom = [n for n in ("__reduce__", "__reduce_ex__", "__getstate__", "__setstate__")
              if getattr(t, n, None) is not getattr(base, n, None)
              and getattr(getattr(t, n, None), "__module__", None) != "dataclasses"]
    return not custom


# -- encode --------------------------------------------------------------------------------
def encode(obj: Any, key: tuple = (), leaf: Leaf = _copy_leaf) -> Any:
    """A copy of ``obj`` made of plain values, tensors and arrays only.

    Args:
        key: the value's place in the state (dict keys as ``repr``, list indices as ``int``,
            attributes as ``.name``), for error messages and ``leaf``.
        leaf: copies a tensor or a numeric numpy array (the snapshot's pooled copy).

    Raises:
        UnsupportedStateError: a value that could not be restored; names its place and type.
    """
    t = type(obj)
    if t in _SCALARS:
        return obj
    if t is dict or t is collections.OrderedDict:
        if TAG in obj or not all(_plain_key(k) for k in obj):
            return _tagged(t.__name__, v=_pairs(obj.items(), key, leaf))
        out = collections.OrderedDict() if t is collections.OrderedDict else {}
        for k, v in obj.items():
            out[k] = encode(v, key + (repr(k),), leaf)
        meta = getattr(obj, "_metadata", None)  # nn.Module.state_dict() versions
        if meta is not None:
            out._metadata = encode(meta, key + (" (_metadata)",))  # type: ignore[attr-defined]
        return out
    if t is list:
        return [encode(v, key + (i,), leaf) for i, v in enumerate(obj)]
    if t is tuple:
        return tuple(encode(v, key + (i,), leaf) for i, v in enumerate(obj))
    enc = _ENCODERS.get(t) or _late_encoder(t)
    if enc is not None:
        return enc(obj, key, leaf)
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            return leaf(obj, key)
        if t in (torch.Size, torch.dtype, torch.device, torch.qscheme):
            return obj
    np = sys.modules.get("numpy")
    if np is not None:
        if t is np.ndarray:
            if not obj.dtype.hasobject:
                return leaf(obj, key)
            return _tagged("ndarray-object", shape=list(obj.shape),
                           v=[encode(v, key + (i,), leaf) for i, v in enumerate(obj.ravel())])
        if isinstance(obj, (np.generic, np.dtype)) and not isinstance(obj, np.object_):
            return obj
        if t is np.random.Generator:
            return _tagged("Generator", v=_bitgen(obj.bit_generator, key, leaf))
        if t is np.random.RandomState:
            return _tagged("RandomState", v=encode(obj.get_state(legacy=False), key, leaf))
        if t.__name__ in _BITGENS and t is getattr(np.random, t.__name__):
            return _tagged("BitGenerator", v=_bitgen(obj, key, leaf))
    if isinstance(obj, enum.Enum):
        cls = _class_path(obj, key, "Enum")
        if t.__members__.get(obj.name) is obj:  # type: ignore[arg-type]
            return _tagged("Enum", cls=cls, name=obj.name)
        return _tagged("Enum", cls=cls, value=encode(obj.value, key + (".value",), leaf))  # a Flag combination
    if isinstance(obj, tuple) and hasattr(t, "_fields") and hasattr(t, "_make"):
        if not _plain_pickling(t, tuple) or getattr(obj, "__dict__", None):
            raise _refuse(obj, key, "is a namedtuple with its own pickling or attributes")
        return _tagged("namedtuple", cls=_class_path(obj, key, "namedtuple"),
                       v=[encode(v, key + (f".{f}",), leaf) for f, v in zip(t._fields, obj)])
    if dataclasses.is_dataclass(obj) and isinstance(t, type):
        if not _plain_pickling(t, object):
            raise _refuse(obj, key, "is a dataclass with its own pickling (__reduce__/__getstate__)")
        names = [f.name for f in dataclasses.fields(obj)]
        names += [n for n in getattr(obj, "__dict__", {}) if n not in names]
        return _tagged("dataclass", cls=_class_path(obj, key, "dataclass"),
                       v=[[n, encode(getattr(obj, n), key + (f".{n}",), leaf)] for n in names])
    raise _refuse(obj, key)


def _bitgen(bg: Any, key: tuple, leaf: Leaf) -> dict[str, Any]:
    np = sys.modules["numpy"]
    name = type(bg).__name__
    if name not in _BITGENS or type(bg) is not getattr(np.random, name):
        raise _refuse(bg, key, "is not one of numpy's bit generators " + ", ".join(_BITGENS))
    ss = getattr(bg, "seed_seq", None) or getattr(bg, "_seed_seq", None)
    seed = None
    if type(ss) is np.random.SeedSequence:  # kept so that spawn() continues as before
        seed = {"entropy": ss.entropy, "spawn_key": list(ss.spawn_key), "pool_size": ss.pool_size,
                "n_children_spawned": ss.n_children_spawned}
    return encode({"name": name, "state": bg.state, "seed_seq": seed}, key, leaf)


def _defaultdict(obj: Any, key: tuple, leaf: Leaf) -> Any:
    f = obj.default_factory
    name = "None" if f is None else getattr(f, "__name__", "")
    if _FACTORIES.get(name, ...) is not f:
        raise _refuse(obj, key, f"has default_factory {f!r}, which is not one of "
                                f"{', '.join(_FACTORIES)}")
    return _tagged("defaultdict", factory=name, v=_pairs(obj.items(), key, leaf))


def _slice(obj: Any, key: tuple, leaf: Leaf) -> Any:
    if not all(_plain_key(x) for x in (obj.start, obj.stop, obj.step)):
        raise _refuse(obj, key, "holds values other than numbers")
    return obj


def _tz(obj: Any, key: tuple, leaf: Leaf) -> Any:
    return encode(obj.tzinfo, key + (".tzinfo",), leaf)


def _zoneinfo(obj: Any, key: tuple, leaf: Leaf) -> Any:
    if obj.key is None:
        raise _refuse(obj, key, "was read from a file, not a time zone key")
    return _tagged("ZoneInfo", v=obj.key)


_ENCODERS: dict[type, Callable[[Any, tuple, Leaf], Any]] = {
    bytearray: lambda o, k, leaf: bytearray(o),
    slice: _slice,
    set: lambda o, k, leaf: set(o) if all(map(_plain_key, o)) else
    _tagged("set", v=[encode(e, k + (" (an element)",), leaf) for e in o]),
    frozenset: lambda o, k, leaf: o if all(map(_plain_key, o)) else
    _tagged("frozenset", v=[encode(e, k + (" (an element)",), leaf) for e in o]),
    collections.deque: lambda o, k, leaf: _tagged("deque", maxlen=o.maxlen,
                                                  v=[encode(e, k + (i,), leaf) for i, e in enumerate(o)]),
    collections.defaultdict: _defaultdict,
    collections.Counter: lambda o, k, leaf: _tagged("Counter", v=_pairs(o.items(), k, leaf)),
    dt.datetime: lambda o, k, leaf: _tagged("datetime", tz=_tz(o, k, leaf), v=[
        o.year, o.month, o.day, o.hour, o.minute, o.second, o.microsecond, o.fold]),
    dt.date: lambda o, k, leaf: _tagged("date", v=[o.year, o.month, o.day]),
    dt.time: lambda o, k, leaf: _tagged("time", tz=_tz(o, k, leaf), v=[
        o.hour, o.minute, o.second, o.microsecond, o.fold]),
    dt.timedelta: lambda o, k, leaf: _tagged("timedelta", v=[o.days, o.seconds, o.microseconds]),
    dt.timezone: lambda o, k, leaf: _tagged("timezone", v=[encode(a, k) for a in o.__getinitargs__()]),
    decimal.Decimal: lambda o, k, leaf: _tagged("Decimal", v=str(o)),
    fractions.Fraction: lambda o, k, leaf: _tagged("Fraction", v=[o.numerator, o.denominator]),
    uuid.UUID: lambda o, k, leaf: _tagged("UUID", v=str(o)),
    random.Random: lambda o, k, leaf: _tagged("Random", v=encode(o.getstate(), k)),
    types.SimpleNamespace: lambda o, k, leaf: _tagged("SimpleNamespace", v=_pairs(vars(o).items(), k, leaf)),
    **{c: (lambda o, k, leaf: _tagged("Path", cls=type(o).__name__, v=str(o))) for c in _PATHS.values()},
}


def _late_encoder(t: type) -> Callable[[Any, tuple, Leaf], Any] | None:
    """Types of modules spotckpt does not import itself (only a state holding one has)."""
    zi, ap = sys.modules.get("zoneinfo"), sys.modules.get("argparse")
    if zi is not None and t is zi.ZoneInfo:
        return _zoneinfo
    if ap is not None and t is ap.Namespace:
        return lambda o, k, leaf: _tagged("Namespace", v=_pairs(vars(o).items(), k, leaf))
    return None


def _find(module: str, qualname: str) -> Any:
    """The object at ``module.qualname``, among modules already imported; None if absent."""
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None or part.startswith("<"):
            return None
        obj = getattr(obj, part, None)
    return obj
