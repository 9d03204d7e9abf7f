"""Hyperparameters from a file are untrusted input (issue 26, item 4): whatever a
``--hyperparameters FILE.json`` holds, ``spotckpt run`` either passes it to the command (as
``--KEY VALUE`` arguments and ``SM_*`` variables) or refuses it with one line and exit
status 2 before anything happens (no pull, no generation claimed, no command started);
never a traceback after the pull and the claim.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import run_env
from hypothesis import given, settings, strategies as st
from proc_helpers import PY, run, spotckpt

from spotckpt._errors import ConfigError
from spotckpt._sagemaker._env import Contract, parse_hyperparameters


def _write(path: Path, doc: dict) -> Path:
    # json.dumps escapes NUL and lone surrogates: the file is valid JSON either way
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("doc, needle", [
    ({"a=b": "1"}, "'='"),                        # an environment variable name cannot hold '='
    ({"epochs": "5\x00rm"}, "NUL"),               # no argument or variable can hold a NUL
    ({"": "1"}, "empty"),
    ({"name": {"x": "\x00"}}, "NUL"),             # nested: --name x=<NUL>
    ({"lr": "\ud800"}, "not valid"),              # a lone surrogate cannot be encoded
])
def test_hostile_hyperparameter_file_is_one_line_and_exit_2_before_anything(
        tmp_path: Path, doc: dict, needle: str) -> None:
    remote = tmp_path / "remote"
    marker = tmp_path / "started"
    hps = _write(tmp_path / "hps.json", doc)
    r = run(spotckpt("run", "--local-dir", str(tmp_path / "local"), "--remote", f"file://{remote}/",
                     "--ml-root", str(tmp_path / "ml"), "--hyperparameters", str(hps),
                     "--", PY, "-c", f"open({str(marker)!r}, 'w')"), env=run_env(), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--hyperparameters" in lines[0] and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists()                     # the command never started
    assert not remote.exists()                     # no pull, no claim, no probe: nothing happened
    assert not (tmp_path / "ml").exists()


_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                      max_leaves=6)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(doc=st.dictionaries(_text, _value | _text, max_size=4))
def test_any_hyperparameter_file_is_refused_or_reaches_the_command(tmp_path_factory, doc: dict) -> None:
    """Generated files (any keys, any JSON values, NULs, '=', surrogates, nesting): parsing
    refuses with a ConfigError naming the file, or every argument and variable the contract
    makes can be given to a real command (exec'd here), which sees them unchanged."""
    path = _write(tmp_path_factory.mktemp("hps") / "hps.json", doc)
    try:
        hps = parse_hyperparameters([], [str(path)])
    except ConfigError as e:
        assert str(e).startswith(f"spotckpt: --hyperparameters {path}: ") and "\n" not in str(e)
        return
    c = Contract(Path("/opt/ml"), {}, hps, None, "job")
    env, args = c.env({}), c.user_args()
    out = subprocess.run([PY, "-c", "import json, os, sys; print(json.dumps([sys.argv[1:], dict(os.environ)]))",
                          *args], env=env, capture_output=True, text=True, timeout=60, check=True)
    seen_args, seen_env = json.loads(out.stdout)
    assert seen_args == args
    assert {k: v for k, v in seen_env.items() if k in env} == env
