"""Rebuilding the values :mod:`spotckpt._state._values` encoded (see its docstring for the rules).

Nothing a checkpoint says is called except the constructors of a fixed list, and the user
classes that :func:`_user_class` finds: already imported, of the recorded kind, rebuilt
without ``__init__``.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import enum
import fractions
import random
import types
import uuid
from typing import Any, Callable

from spotckpt._errors import CorruptCheckpointError, UnsupportedStateError

from ._values import _BITGENS, _FACTORIES, _PATHS, TAG, _find, _plain_pickling, render


def decode(obj: Any, key: tuple = ()) -> Any:
    """Rebuild what :func:`encode` tagged, in place where the container is mutable (the
    payload was just loaded and belongs to nobody else).

    Raises:
        CorruptCheckpointError: a tag that is unknown or does not rebuild.
        UnsupportedStateError: a user class that is not imported (named in the message).
    """
    t = type(obj)
    if t is dict or t is collections.OrderedDict:
        if TAG in obj:
            return _decode_tagged(obj, key)
        for k, v in obj.items():
            new = decode(v, key + (repr(k),))
            if new is not v:
                obj[k] = new
        return obj
    if t is list:
        for i, v in enumerate(obj):
            new = decode(v, key + (i,))
            if new is not v:
                obj[i] = new
        return obj
    if t is tuple:
        new = tuple(decode(v, key + (i,)) for i, v in enumerate(obj))
        return obj if all(a is b for a, b in zip(new, obj)) else new
    return obj


def _user_class(rec: dict, key: tuple, kind: str, check: Callable[[Any], bool]) -> Any:
    module, qualname = rec["cls"]
    cls = _find(str(module), str(qualname))
    if cls is None:
        raise UnsupportedStateError(
            f"spotckpt: the checkpoint's {render(key)} is a {kind} of class {module}.{qualname}, "
            f"which is not loaded; import {module} before the Checkpointer restores")
    if not (isinstance(cls, type) and check(cls)):
        raise CorruptCheckpointError(f"spotckpt: the checkpoint's {render(key)} names "
                                     f"{module}.{qualname} as a {kind}, which it is not")
    return cls


def _dataclass(rec: dict, key: tuple) -> Any:
    cls = _user_class(rec, key, "dataclass", lambda c: dataclasses.is_dataclass(c) and _plain_pickling(c, object))
    obj = object.__new__(cls)
    saved = {str(n): v for n, v in rec["v"]}
    for f in dataclasses.fields(cls):
        if f.name not in saved:  # a field added since the save
            if f.default is not dataclasses.MISSING:
                saved[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                saved[f.name] = f.default_factory()
            else:
                raise UnsupportedStateError(f"spotckpt: the checkpoint's {render(key)} has no field "
                                            f"{f.name!r}, which {cls.__qualname__} now requires")
    for n, v in saved.items():
        if n.startswith("__") or not n.isidentifier():
            raise CorruptCheckpointError(f"spotckpt: the checkpoint's {render(key)} sets {n!r}")
        object.__setattr__(obj, n, v)
    return obj


def _namedtuple(rec: dict, key: tuple) -> Any:
    cls = _user_class(rec, key, "namedtuple", lambda c: issubclass(c, tuple) and hasattr(c, "_fields")
                      and _plain_pickling(c, tuple))
    if len(rec["v"]) != len(cls._fields):
        raise UnsupportedStateError(f"spotckpt: the checkpoint's {render(key)} has {len(rec['v'])} "
                                    f"items; {cls.__qualname__} now has fields {cls._fields}")
    return tuple.__new__(cls, rec["v"])


def _enum(rec: dict, key: tuple) -> Any:
    cls = _user_class(rec, key, "Enum", lambda c: issubclass(c, enum.Enum))
    if "name" in rec:
        return cls.__members__[rec["name"]]
    return cls(rec["value"])


def _np_bitgen(rec: dict) -> Any:
    import numpy as np

    if rec["name"] not in _BITGENS:
        raise ValueError(f"unknown bit generator {rec['name']!r}")
    s = rec["seed_seq"]
    ss = None if s is None else np.random.SeedSequence(
        s["entropy"], spawn_key=tuple(s["spawn_key"]), pool_size=s["pool_size"],
        n_children_spawned=s["n_children_spawned"])
    bg = getattr(np.random, rec["name"])(ss)
    bg.state = rec["state"]
    return bg


def _np_randomstate(st: dict) -> Any:
    import numpy as np

    if st["bit_generator"] not in _BITGENS:
        raise ValueError(f"unknown bit generator {st['bit_generator']!r}")
    rs = np.random.RandomState(getattr(np.random, st["bit_generator"])())
    rs.set_state(st)
    return rs


def _ndarray_object(rec: dict) -> Any:
    import numpy as np

    a = np.empty(len(rec["v"]), dtype=object)
    for i, v in enumerate(rec["v"]):
        a[i] = v
    return a.reshape(rec["shape"])


def _random(v: Any) -> random.Random:
    r = random.Random()
    r.setstate((v[0], tuple(v[1]), v[2]))
    return r


def _namespace(v: Any) -> Any:
    import argparse

    return argparse.Namespace(**{str(k): x for k, x in v})


_DECODERS: dict[str, Callable[[dict], Any]] = {
    "dict": lambda r: {k: v for k, v in r["v"]},
    "OrderedDict": lambda r: collections.OrderedDict((k, v) for k, v in r["v"]),
    "set": lambda r: set(r["v"]),
    "frozenset": lambda r: frozenset(r["v"]),
    "deque": lambda r: collections.deque(r["v"], maxlen=r["maxlen"]),
    "defaultdict": lambda r: collections.defaultdict(_FACTORIES[r["factory"]], ((k, v) for k, v in r["v"])),
    "Counter": lambda r: collections.Counter({k: v for k, v in r["v"]}),
    "datetime": lambda r: dt.datetime(*r["v"][:7], tzinfo=r["tz"], fold=r["v"][7]),
    "date": lambda r: dt.date(*r["v"]),
    "time": lambda r: dt.time(*r["v"][:4], tzinfo=r["tz"], fold=r["v"][4]),
    "timedelta": lambda r: dt.timedelta(*r["v"]),
    "timezone": lambda r: dt.timezone(*r["v"]),
    "ZoneInfo": lambda r: __import__("zoneinfo").ZoneInfo(str(r["v"])),
    "Decimal": lambda r: decimal.Decimal(str(r["v"])),
    "Fraction": lambda r: fractions.Fraction(*r["v"]),
    "UUID": lambda r: uuid.UUID(str(r["v"])),
    "Path": lambda r: _PATHS[r["cls"]](str(r["v"])),
    "Random": lambda r: _random(r["v"]),
    "SimpleNamespace": lambda r: types.SimpleNamespace(**{str(k): v for k, v in r["v"]}),
    "Namespace": lambda r: _namespace(r["v"]),
    "ndarray-object": _ndarray_object,
    "Generator": lambda r: __import__("numpy").random.Generator(_np_bitgen(r["v"])),
    "BitGenerator": lambda r: _np_bitgen(r["v"]),
    "RandomState": lambda r: _np_randomstate(r["v"]),
}
_USER: dict[str, Callable[[dict, tuple], Any]] = {"dataclass": _dataclass, "namedtuple": _namedtuple,
                                                  "Enum": _enum}


def _decode_tagged(rec: dict, key: tuple) -> Any:
    kind = rec[TAG]
    fields = {k: (v if k in ("cls", "name", TAG) else decode(v, key)) for k, v in rec.items()}
    try:
        if kind in _USER:
            return _USER[kind](fields, key)
        return _DECODERS[kind](fields)
    except (UnsupportedStateError, CorruptCheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure to rebuild is a bad checkpoint
        raise CorruptCheckpointError(f"spotckpt: the checkpoint's {render(key)} ({kind!r}) does not "
                                     f"rebuild: {type(e).__name__}: {e}".splitlines()[0]) from e
