"""Exact data position without user tricks: a shuffled DataLoader, a model with dropout,
SIGTERM at a random step mid-epoch (sent once the script reports that step, which then waits
for the test: no sleeps), a restart on an empty local dir from the S3 server, and final
weights bitwise equal to an uninterrupted run's.

- custom loop, plain ``DataLoader(shuffle=True)`` through ``ckpt.batches(loader)``, with
  0 and 2 worker processes (their seeds come from the base seed ``iter()`` draws);
- custom loop, torchdata ``StatefulDataLoader`` in the state dict (its ``iter()`` must not
  move the RNG spotckpt restored);
- Lightning with a plain shuffled ``DataLoader`` (``examples/train_lightning.py``).
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES, S3Server
from test_integration_common import remote_steps, resumed_step, run, script_env

SCRIPT = Path(__file__).parents[1] / "scripts" / "data_position_train.py"
STEPS, PER_EPOCH = 36, 12


def interrupt_at(argv: list[str], env: dict[str, str], step: int, pattern: str = "step {}") -> str:
    """Start ``argv`` (which waits on stdin after printing ``pattern.format(step)``), SIGTERM
    it there, let it go on; assert it saved, made that durable and exited 143."""
    proc = subprocess.Popen(argv, env=env, cwd=str(EXAMPLES.parent), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == pattern.format(step):
            break
    proc.send_signal(signal.SIGTERM)
    proc.stdin.write("go\n")
    proc.stdin.close()
    out = "".join(lines) + proc.stdout.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, out
    assert "durable" in out, out
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max abs diff {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("loader,workers", [("plain", 0), ("plain", 2), ("stateful", 0), ("stateful", 2)])
def test_custom_loop_resumes_mid_epoch_bitwise(loader: str, workers: int, s3_server: S3Server,
                                               tmp_path: Path) -> None:
    args = [str(SCRIPT), "--loader", loader, "--workers", str(workers), "--steps", str(STEPS)]
    ref_remote = f"s3://{s3_server.new_bucket()}/ref/"
    run(args[0], [*args[1:], "--out", str(tmp_path / "ref.pt")],
        script_env(s3_server, tmp_path / "ref-local", ref_remote), timeout=120)

    remote = f"s3://{s3_server.new_bucket()}/run/"
    # a random step inside the second or third epoch, never its last: the save is mid-epoch
    step = random.choice([s for s in range(PER_EPOCH, STEPS - 1) if (s + 1) % PER_EPOCH])
    out1 = interrupt_at([sys.executable, *args, "--wait-at", str(step), "--out", str(tmp_path / "x.pt")],
                        script_env(s3_server, tmp_path / "local-1", remote), step)
    assert remote_steps(s3_server, remote)[-1] == step + 1, out1

    out2 = run(args[0], [*args[1:], "--out", str(tmp_path / "final.pt")],
               script_env(s3_server, tmp_path / "local-2", remote), timeout=120)  # a new machine
    assert resumed_step(out2) == step + 1, out2
    assert_bitwise(torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "final.pt"))


LIGHTNING_EPOCHS, LIGHTNING_PER_EPOCH = 2, 32
LIGHTNING_ARGS = ["--max-epochs", str(LIGHTNING_EPOCHS), "--every-steps", "10"]
# examples/train_lightning.py (a plain DataLoader(shuffle=True)), waiting on stdin after
# printing "training step N" for the step the test interrupts.
WAIT_AT_STEP = """
import sys
sys.path.insert(0, {examples!r})
import train_lightning as ex

class Model(ex.Regressor):
    def training_step(self, batch, batch_idx):
        print(f"training step {{self.global_step}}", flush=True)
        if self.global_step == {step}:
            sys.stdin.readline()
        return super().training_step(batch, batch_idx)

ex.Regressor = Model
ex.main()
"""


@pytest.mark.slow
def test_lightning_plain_dataloader_resumes_mid_epoch_bitwise(s3_server: S3Server, tmp_path: Path) -> None:
    ref_remote = f"s3://{s3_server.new_bucket()}/ref/"
    run("train_lightning.py", [*LIGHTNING_ARGS, "--out", str(tmp_path / "ref.pt")],
        script_env(s3_server, tmp_path / "ref-local", ref_remote), timeout=180)

    remote = f"s3://{s3_server.new_bucket()}/run/"
    total = LIGHTNING_EPOCHS * LIGHTNING_PER_EPOCH
    step = random.choice([s for s in range(1, total - 1) if (s + 1) % LIGHTNING_PER_EPOCH])
    wrapper = tmp_path / "wait_at_step.py"
    wrapper.write_text(WAIT_AT_STEP.format(examples=str(EXAMPLES), step=step))
    out1 = interrupt_at([sys.executable, str(wrapper), *LIGHTNING_ARGS],
                        script_env(s3_server, tmp_path / "local-1", remote), step, "training step {}")
    assert remote_steps(s3_server, remote)[-1] == step + 1, out1

    out2 = run("train_lightning.py", [*LIGHTNING_ARGS, "--out", str(tmp_path / "final.pt")],
               script_env(s3_server, tmp_path / "local-2", remote), timeout=180)
    assert resumed_step(out2) == step + 1, out2
    assert_bitwise(torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "final.pt"))
    assert "not resumable" not in out2, out2  # Lightning's warning: it is resumed here


class _Counting(torch.utils.data.Dataset):
    """24 samples; remembers which ones were loaded."""

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loaded.append(i)
        return torch.tensor(i)


def test_batches_skip_at_the_sampler_and_leave_the_rng_alone() -> None:
    """In-process: resumed after 3 batches of an epoch of 6, the next 7 batches are the
    uninterrupted run's, the 3 skipped are never loaded, and the global RNG ends where the
    uninterrupted run's did (it is drawn from between batches, as dropout would)."""
    from spotckpt._state._batches import Batches

    data = _Counting()
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)

    def take(b: Batches, n: int) -> list[list[int]]:
        out = []
        for _ in range(n):
            out.append(next(b).tolist())
            torch.rand(3)  # the training step's own draws
        return out

    torch.manual_seed(0)
    ref = take(Batches(loader, own_loader_state=True, saved=None), 10)
    ref_rng = torch.get_rng_state()

    torch.manual_seed(0)
    first = Batches(loader, own_loader_state=True, saved=None)
    assert take(first, 3) == ref[:3]
    saved, rng = first.state_dict(), torch.get_rng_state()  # what a checkpoint holds
    data.loaded.clear()
    torch.manual_seed(123)  # a new process
    torch.set_rng_state(rng)  # the Checkpointer's restore
    resumed = Batches(loader, own_loader_state=True, saved=saved)
    assert take(resumed, 7) == ref[3:]
    assert sorted(data.loaded) == sorted(i for batch in ref[3:] for i in batch)  # nothing skipped was loaded
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert (resumed.epoch, resumed.index) == (1, 4)
