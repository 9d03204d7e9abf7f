"""A state holding every value type spotckpt restores (see docs/guides/custom-loop.md, "What a state may hold").

    python state_values_train.py save [--torch]     # commit step 1 and make it durable
    python state_values_train.py restore [--torch]  # restore into a fresh state; print a JSON
                                                    # report {name: [equal, saved type, restored type]}

Local dir and remote come from SPOTCKPT_LOCAL_DIR / SPOTCKPT_REMOTE. Without --torch, torch
is never imported, so the pickle-safe serialiser is used.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import decimal
import enum
import fractions
import json
import pathlib
import random
import sys
import types
import typing
import uuid
import zoneinfo

import numpy as np

import spotckpt

Point = collections.namedtuple("Point", "x y")


class Pair(typing.NamedTuple):
    left: int
    right: list


@dataclasses.dataclass
class Settings:
    lr: float
    milestones: list = dataclasses.field(default_factory=list)
    point: Point = Point(0, 0)


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str
    when: dt.datetime


class Phase(enum.Enum):
    WARMUP = "warmup"
    MAIN = "main"


class Perm(enum.IntFlag):
    R = 4
    W = 2


def rng_draws(r: typing.Any) -> list:
    if isinstance(r, random.Random):
        return [r.random() for _ in range(3)]
    if isinstance(r, np.random.RandomState):
        return r.randn(3).tolist() + r.randint(0, 1 << 30, 3).tolist()
    return r.random(3).tolist() + r.integers(0, 1 << 30, 3).tolist()


def values() -> dict[str, typing.Any]:
    """The same values on every call (both phases build them)."""
    gen = np.random.default_rng(1234)
    gen.random(5)  # advanced: a fresh generator with the same seed would not do
    mt = np.random.Generator(np.random.MT19937(7))
    mt.random(3)
    legacy = np.random.RandomState(42)
    legacy.randn(3)  # leaves a cached gaussian (has_gauss)
    pyrng = random.Random(9)
    pyrng.random()
    counts = collections.defaultdict(int, {"a": 3, ("b", 1): 2})
    by_phase = collections.defaultdict(list, {Phase.WARMUP: [1, 2]})
    return {
        "deque": collections.deque([0.5, 0.25, (1, 2)], maxlen=4),
        "namedtuple": Point(1, [2, 3]),
        "typing-namedtuple": Pair(5, [Point(1, 2)]),
        "dataclass": Settings(0.1, [10, 20], Point(3, 4)),
        "frozen-dataclass": Frozen("x", dt.datetime(2024, 5, 6, 7, 8, 9, 10)),
        "enum": Phase.MAIN,
        "int-flag": Perm.R | Perm.W,
        "datetime": dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
        "datetime-utc": dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc),
        "datetime-offset": dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-5), "EST")),
        "datetime-zoneinfo": dt.datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
        "date": dt.date(1999, 12, 31),
        "time": dt.time(13, 14, 15, 16),
        "timedelta": dt.timedelta(days=-1, seconds=5, microseconds=7),
        "Decimal": decimal.Decimal("3.14159265358979323846264338327950288"),
        "Fraction": fractions.Fraction(-22, 7),
        "Path": pathlib.Path("/data/run-1/shard-03.tar"),
        "PurePosixPath": pathlib.PurePosixPath("a/b"),
        "UUID": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "Generator": gen,
        "Generator-MT19937": mt,
        "RandomState": legacy,
        "random.Random": pyrng,
        "BitGenerator": np.random.PCG64DXSM(11),
        "defaultdict": counts,
        "defaultdict-enum-keys": by_phase,
        "Counter": collections.Counter("abracadabra"),
        "OrderedDict": collections.OrderedDict([("b", 1), ("a", 2)]),
        "set-of-uuids": {uuid.UUID(int=1), uuid.UUID(int=2)},
        "enum-keys": {Phase.WARMUP: 1, Phase.MAIN: 2},
        "SimpleNamespace": types.SimpleNamespace(a=1, b=[Phase.MAIN]),
        "argparse.Namespace": argparse.Namespace(lr=0.1, out=pathlib.Path("out")),
        "ndarray": np.arange(6, dtype=np.int16).reshape(2, 3),
        "ndarray-object": np.array([Phase.MAIN, None, (1, "a")], dtype=object),
        "nested": {"sched": {"history": collections.deque([dt.timedelta(seconds=1)], maxlen=2)}},
    }


def same(a: typing.Any, b: typing.Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, (random.Random, np.random.Generator, np.random.RandomState)):
        return rng_draws(a) == rng_draws(b)
    if isinstance(a, np.random.BitGenerator):
        return a.state == b.state and a.random_raw(3).tolist() == b.random_raw(3).tolist()
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and all(x == y for x, y in zip(a.ravel(), b.ravel()))
    if isinstance(a, collections.defaultdict) and a.default_factory is not b.default_factory:
        return False
    if isinstance(a, dt.datetime) and (a.tzinfo, a.fold) != (b.tzinfo, b.fold):
        return False
    return bool(a == b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["save", "restore"])
    ap.add_argument("--torch", action="store_true")
    args = ap.parse_args()
    if args.torch:
        import torch  # noqa: F401 - selects the torch serializer (weights_only loading)
    expected = values()
    if args.phase == "save":
        state = {"values": expected, "top-deque": collections.deque([1, 2], maxlen=3),
                 "top-dataclass": Settings(0.5)}
        with spotckpt.Checkpointer(state) as ckpt:
            ckpt.step = 1
            ckpt.save(blocking=True)
            assert ckpt.flush(timeout=60), ckpt.last_error
    else:
        state = {"values": None, "top-deque": None, "top-dataclass": None}
        with spotckpt.Checkpointer(state) as ckpt:
            assert ckpt.restored_step == 1, ckpt.restored_step
        got = dict(state["values"], **{"top-deque": state["top-deque"], "top-dataclass": state["top-dataclass"]})
        expected.update({"top-deque": collections.deque([1, 2], maxlen=3), "top-dataclass": Settings(0.5)})
        report = {k: [same(v, got[k]), type(v).__name__, type(got[k]).__name__] for k, v in expected.items()}
        print(json.dumps({"torch": "torch" in sys.modules, "report": report}))


if __name__ == "__main__":
    main()
