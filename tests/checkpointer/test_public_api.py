"""The public surface survives the package split: the names users import, the entry points,
and checkpoints written by the code before it (tests/data/pre-split/, made by
tests/data/make_pre_split.py with spotckpt 0.1.0 as it was before the move; tests/data/torch-format/,
the same script with the last code that wrote the ``torch`` serializer, before issue 25's
``safetensors`` payload)."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spotckpt

DATA_DIR = Path(__file__).parents[1] / "data"

PUBLIC = ["Checkpointer", "Notice", "SpotckptError", "ConfigError", "LocalDirError", "RemoteError",
          "NoCheckpointError", "CorruptCheckpointError", "CheckpointLockedError", "MissingDependencyError",
          "UnsupportedStateError", "WorldSizeError", "StaleGenerationError", "__version__"]


def test_public_names_are_pinned() -> None:
    assert sorted(spotckpt.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(spotckpt, name) is not None
    assert issubclass(spotckpt.NoCheckpointError, (spotckpt.SpotckptError, FileNotFoundError))
    assert spotckpt.Checkpointer.__module__.startswith("spotckpt.")


@pytest.mark.parametrize("framework", ["lightning", "keras", "xgboost", "transformers"])
def test_integrations_import_as_before(framework: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    module = importlib.import_module(f"spotckpt.integrations.{framework}")
    assert module.SpotCheckpoint.__module__ == f"spotckpt.integrations.{framework}"


def test_entry_points() -> None:
    from spotckpt.cli import main

    assert callable(main)
    out = subprocess.run([sys.executable, "-m", "spotckpt", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and spotckpt.__version__ in out.stdout + out.stderr, out
    script = Path(sys.executable).with_name("spotckpt")
    if script.exists():  # the console script pyproject declares
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and spotckpt.__version__ in out.stdout + out.stderr, out


def test_importing_spotckpt_imports_no_framework() -> None:
    code = ("import sys, spotckpt, spotckpt.cli; "
            "print(sorted(m for m in ('torch', 'keras', 'xgboost', 'lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out


@pytest.mark.parametrize("written_by", ["pre-split", "torch-format"])
def test_checkpoint_written_before_the_split_restores(tmp_path: Path, written_by: str) -> None:
    torch = pytest.importorskip("torch")
    DATA = DATA_DIR / written_by
    remote = tmp_path / "remote"
    shutil.copytree(DATA / "remote", remote)
    expected = torch.load(DATA / "expected.pt", weights_only=True)
    torch.manual_seed(0)  # other initial weights than the writer's
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"model": model, "optim": opt, "extra": {}}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "local",
                               remote=remote.as_uri() + "/", every_steps=100) as ckpt:
        assert ckpt.restored_step == 6
        for key, value in expected["model"].items():
            assert torch.equal(model.state_dict()[key], value), key
        momentum = [s["momentum_buffer"] for s in opt.state_dict()["state"].values()]
        assert all(torch.equal(a, b["momentum_buffer"])
                   for a, b in zip(momentum, expected["optim"]["state"].values(), strict=True))
        extra = state["extra"]  # a plain value is replaced in the mapping, not updated in place
        # steps() yields 0..5; checkpoint 6 is the state after six steps, taken with epoch = 5
        assert extra["epoch"] == 5 and extra["name"] == "pre-split"  # (both were written by the same script) and extra["history"] == [0.5, 0.25]
        assert extra["array"].tolist() == list(range(6))
    assert (tmp_path / "local" / "notes.txt").read_text() == "written by the script itself\n"
