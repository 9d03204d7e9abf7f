"""What a state may hold: every value type a training state commonly holds saves and comes
back equal and of the same type, under both serialisers, from the S3 server into an empty
local dir in a new process; anything else is refused at the first save, naming its place and
type; a checkpoint's tags cannot make the restore import or call anything else."""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
from pathlib import Path

import pytest

import spotckpt
from conftest import S3Server
from spotckpt._state import _values
from spotckpt._state._values_decode import decode
from test_integration_common import run, script_env

SCRIPT = Path(__file__).parents[1] / "scripts" / "state_values_train.py"


@pytest.mark.parametrize("serializer", ["torch", "pickle-safe"])
def test_every_supported_type_restores_equal_and_same_type(serializer: str, s3_server: S3Server,
                                                           s3_remote: str, tmp_path: Path) -> None:
    """Regression: deque, namedtuple, dataclass, Enum, datetime, timedelta, Decimal, Fraction,
    Path, UUID, numpy Generator/RandomState saved without complaint and failed every restart
    under torch.load(weights_only=True); defaultdict and Counter came back as dict."""
    flag = ["--torch"] if serializer == "torch" else []
    run(SCRIPT, ["save", *flag], script_env(s3_server, tmp_path / "machine-1", s3_remote))
    manifest = json.loads(next((tmp_path / "machine-1").glob("step-*/MANIFEST.json")).read_text())
    assert manifest["serializer"] == ("safetensors" if serializer == "torch" else serializer)
    out = run(SCRIPT, ["restore", *flag], script_env(s3_server, tmp_path / "machine-2", s3_remote))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["torch"] == (serializer == "torch")
    bad = {k: v for k, v in result["report"].items() if v != [True, v[1], v[1]]}
    assert not bad, bad
    assert len(result["report"]) >= 30


class Opaque:
    pass


class Sched:
    """An object with state_dict() whose state holds something that cannot be restored."""

    def __init__(self, bad: object) -> None:
        self.bad = bad

    def state_dict(self) -> dict:
        return {"history": [1, 2, 3, self.bad]}

    def load_state_dict(self, sd: dict) -> None:
        pass


class AttrDict(dict):
    pass


def _local_dataclass() -> object:
    @dataclasses.dataclass
    class Local:
        x: int = 1
    return Local()


class Custom:
    def __init__(self) -> None:
        self.x = 1


@dataclasses.dataclass
class Reducing:
    x: int = 1

    def __reduce__(self) -> tuple:
        return (print, ("ran",))


REFUSED = {
    "opaque object": (Opaque(), "test_state_values.Opaque"),
    "lambda default_factory": (collections.defaultdict(lambda: 0), "default_factory"),
    "dict subclass": (AttrDict(a=1), "test_state_values.AttrDict"),
    "dataclass defined in a function": (_local_dataclass(), "inside a function"),
    "dataclass with __reduce__": (Reducing(), "its own pickling"),
    "generator": ((i for i in range(3)), "builtins.generator"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_value_is_refused_at_the_first_save(name: str, tmp_path: Path) -> None:
    value, what = REFUSED[name]
    ckpt = spotckpt.Checkpointer({"sched": Sched(value), "n": 0}, local_dir=tmp_path, remote=None)
    ckpt.open()
    try:
        with pytest.raises(spotckpt.UnsupportedStateError) as ei:
            ckpt.save(blocking=True)
    finally:
        ckpt.close()
    msg = str(ei.value)
    assert "state['sched']['history'][3]" in msg and what in msg and "\n" not in msg, msg
    assert isinstance(ei.value, TypeError)
    assert not list(tmp_path.glob("step-*")), "nothing may be committed"


def test_nested_place_is_named(tmp_path: Path) -> None:
    """The path goes through dataclass fields and dict keys."""
    from test_state_values import Opaque as O  # noqa: N817 - a module-level class

    @dataclasses.dataclass
    class Cfg:
        x: object

    holder = spotckpt.Checkpointer({"cfg": {"run": [Sched(O())]}}, local_dir=tmp_path, remote=None)
    holder.open()
    try:
        with pytest.raises(spotckpt.UnsupportedStateError, match=r"state\['cfg'\]\['run'\]\[0\]: "
                           r"test_state_values\.Sched"):
            holder.save(blocking=True)
    finally:
        holder.close()


def test_an_old_checkpoint_that_cannot_load_names_the_type(tmp_path: Path) -> None:
    """One written before values were refused at the save: the error names the type, not
    only torch's first line ("Weights only load failed ...")."""
    import torch

    from spotckpt._state import _snapshot as _state

    torch.save({"recent": collections.deque([1.0])}, tmp_path / "state.pt")
    with pytest.raises(spotckpt.CorruptCheckpointError) as ei:
        _state.read_state(tmp_path, "torch")
    assert "it holds a collections.deque" in str(ei.value) and "\n" not in str(ei.value)


@dataclasses.dataclass
class Grown:
    a: int
    added: list = dataclasses.field(default_factory=lambda: [1])


def test_a_field_added_since_the_save_takes_its_default() -> None:
    rec = _values.encode(Grown(5, [2]))
    rec["v"] = [p for p in rec["v"] if p[0] != "added"]  # saved before the field existed
    assert decode(rec) == Grown(5, [1])


HOSTILE = {
    "not a dataclass": {_values.TAG: "dataclass", "cls": ["subprocess", "Popen"], "v": [["args", "touch x"]]},
    "a function as a class": {_values.TAG: "dataclass", "cls": ["os", "system"], "v": []},
    "not an Enum": {_values.TAG: "Enum", "cls": ["subprocess", "Popen"], "name": "x"},
    "not a namedtuple": {_values.TAG: "namedtuple", "cls": ["builtins", "tuple"], "v": []},
    "dunder attribute": {_values.TAG: "dataclass", "cls": ["test_state_values", "Reducing"], "v": []},
    "unknown tag": {_values.TAG: "pickle", "v": "cos\nsystem\n"},
    "defaultdict factory": {_values.TAG: "defaultdict", "factory": "eval", "v": []},
    "bit generator": {_values.TAG: "BitGenerator", "v": {"name": "os", "state": {}, "seed_seq": None}},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_tags_are_refused(name: str) -> None:
    with pytest.raises(spotckpt.CorruptCheckpointError) as ei:
        decode({"x": [HOSTILE[name]]})
    assert "state['x'][0]" in str(ei.value) and "\n" not in str(ei.value)


def test_restore_never_imports_a_module() -> None:
    assert "antigravity" not in sys.modules
    with pytest.raises(spotckpt.UnsupportedStateError, match="import antigravity before"):
        decode({_values.TAG: "Enum", "cls": ["antigravity", "X"], "name": "A"})
    assert "antigravity" not in sys.modules
