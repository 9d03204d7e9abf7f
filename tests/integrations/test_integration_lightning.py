"""Lightning: examples/train_lightning.py, SIGTERMed mid-training (at a random moment, and at an
epoch's last batch) and restarted with an empty local dir, resumes from the S3 server and ends
with weights bitwise identical to an uninterrupted run; saves follow the cadence; retention
holds; ``pytorch_lightning`` and ``fit(ckpt_path="last")`` work too."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES, S3Server
from test_integration_common import (check_cadence_and_retention, remote_steps, resumed_step, run,
                                     script_env, sigterm_mid_training, start)

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

SCRIPT = "train_lightning.py"
EPOCHS, STEPS_PER_EPOCH, EVERY = 3, 32, 10
ARGS = ["--max-epochs", str(EPOCHS), "--every-steps", str(EVERY)]

# The example, with a SIGTERM that the process sends itself while training a chosen step.
KILL_AT_STEP = """
import os, signal, sys
sys.path.insert(0, {examples!r})
import train_lightning as ex

class Model(ex.Regressor):
    def training_step(self, batch, batch_idx):
        if self.global_step == {step}:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)

ex.Regressor = Model
ex.main()
"""

# The same, with the SIGTERM while validating after a chosen step: Lightning's own SIGTERM
# handling ends fit there (SIGTERMException) before any training batch boundary.
KILL_IN_VALIDATION = """
import os, signal, sys
sys.path.insert(0, {examples!r})
import train_lightning as ex

class Model(ex.Regressor):
    def validation_step(self, batch, batch_idx):
        if self.global_step == {step} and not self.trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().validation_step(batch, batch_idx)

ex.Regressor = Model
ex.main()
"""


@pytest.fixture(scope="module")
def reference(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run, the first of its job: nothing to restore."""
    tmp = tmp_path_factory.mktemp("lightning-ref")
    remote = f"s3://{s3_server.new_bucket()}/ref/"
    out = run(SCRIPT, [*ARGS, "--out", str(tmp / "ref.pt")], script_env(s3_server, tmp / "local", remote))
    return {"out": out, "local": tmp / "local", "remote": remote, "weights": torch.load(tmp / "ref.pt")}


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_first_run_cadence_and_retention(reference: dict, s3_server: S3Server) -> None:
    assert "fresh start at step 0" in reference["out"]
    assert f"finished at step {EPOCHS * STEPS_PER_EPOCH}" in reference["out"]
    check_cadence_and_retention(s3_server, reference["local"], reference["remote"], EVERY,
                                EPOCHS * STEPS_PER_EPOCH)


def test_sigterm_mid_training_resumes_from_s3_bitwise(reference: dict, s3_server: S3Server,
                                                      s3_remote: str, tmp_path: Path) -> None:
    sleep = 0.03
    proc = start(SCRIPT, [*ARGS, "--sleep", str(sleep)], script_env(s3_server, tmp_path / "local-1", s3_remote))
    out1 = sigterm_mid_training(proc, EPOCHS * STEPS_PER_EPOCH * sleep, random.Random())
    durable = remote_steps(s3_server, s3_remote)[-1]
    assert 0 < durable < EPOCHS * STEPS_PER_EPOCH, out1

    out2 = run(SCRIPT, [*ARGS, "--out", str(tmp_path / "final.pt")],
               script_env(s3_server, tmp_path / "local-2", s3_remote))  # a new machine
    assert resumed_step(out2) == durable, out1 + out2
    assert_bitwise(torch.load(tmp_path / "final.pt"), reference["weights"])


def test_sigterm_in_an_epochs_last_batch_resumes_bitwise(reference: dict, s3_server: S3Server,
                                                         s3_remote: str, tmp_path: Path) -> None:
    boundary = 2 * STEPS_PER_EPOCH
    wrapper = tmp_path / "kill_at_step.py"
    wrapper.write_text(KILL_AT_STEP.format(examples=str(EXAMPLES), step=boundary - 1))
    proc = start(wrapper, ARGS, script_env(s3_server, tmp_path / "local-1", s3_remote))
    out1, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out1
    assert remote_steps(s3_server, s3_remote)[-1] == boundary, out1

    out2 = run(SCRIPT, [*ARGS, "--out", str(tmp_path / "final.pt")],
               script_env(s3_server, tmp_path / "local-2", s3_remote))
    assert resumed_step(out2) == boundary, out2
    assert_bitwise(torch.load(tmp_path / "final.pt"), reference["weights"])


def test_sigterm_during_validation_saves_and_resumes_bitwise(reference: dict, s3_server: S3Server,
                                                          s3_remote: str, tmp_path: Path) -> None:
    """The notice comes after the last training batch's boundary: the callback saves when
    Lightning ends fit (on_exception, then Checkpointer.close). Before the fix close() refused
    its own interruption save ("use the Checkpointer inside `with`"), swallowed the error and
    the process exited 143 with nothing durable."""
    step = 2 * STEPS_PER_EPOCH
    wrapper = tmp_path / "kill_in_validation.py"
    wrapper.write_text(KILL_IN_VALIDATION.format(examples=str(EXAMPLES), step=step))
    proc = start(wrapper, ARGS, script_env(s3_server, tmp_path / "local-1", s3_remote))
    out1, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out1
    assert f"step {step} is durable" in out1, out1
    assert remote_steps(s3_server, s3_remote)[-1] == step, out1

    out2 = run(SCRIPT, [*ARGS, "--out", str(tmp_path / "final.pt")],
               script_env(s3_server, tmp_path / "local-2", s3_remote))
    assert resumed_step(out2) == step, out2
    assert_bitwise(torch.load(tmp_path / "final.pt"), reference["weights"])


PL_SCRIPT = """
import sys
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from spotckpt.integrations.lightning import SpotCheckpoint

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
    def training_step(self, batch, i):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    def on_train_start(self):
        print("start at step", self.trainer.global_step, flush=True)

mode, local = sys.argv[1], sys.argv[2]
pl.seed_everything(0, verbose=False)
data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8)
spot = SpotCheckpoint(every_n_steps=4, local_dir=local, remote=None)
trainer = pl.Trainer(max_epochs=1 if mode == "first" else 2, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", callbacks=[spot])
ckpt_path = {"first": None, "last": "last", "other": local + "/../other.ckpt"}[mode]
try:
    trainer.fit(M(), data, ckpt_path=ckpt_path)
except ValueError as e:
    print("refused:", e)
if mode == "first":
    trainer.save_checkpoint(local + "/../other.ckpt")
print("end at step", trainer.global_step, type(spot).__mro__[2].__module__)
"""


def test_pytorch_lightning_with_ckpt_path_last(tmp_path: Path) -> None:
    script = tmp_path / "pl_train.py"
    script.write_text(PL_SCRIPT)
    local = str(tmp_path / "ck")

    def go(mode: str) -> str:
        p = subprocess.run([sys.executable, str(script), mode, local], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    out = go("first")
    assert "start at step 0" in out and "end at step 8 pytorch_lightning" in out, out
    out = go("last")  # resumes the finished epoch, then trains the second one
    assert "start at step 8" in out and "end at step 16" in out, out
    out = go("other")  # another explicit checkpoint would silently fork the job: refused
    assert "refused: spotckpt: a checkpoint at step 16 exists" in out, out
