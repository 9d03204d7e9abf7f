"""Transformers ``Trainer`` with ``spotckpt.integrations.transformers.SpotCheckpoint`` (issue 12).

A tiny GPT-2 from a config (offline, dropout on, gradient accumulation 2), trained in a
subprocess with the S3 server as remote. Two SIGTERMs at random optimizer steps (the script
reports the step and waits there for the notice: no timing), each run on an empty local dir
and an empty Trainer output dir (a new machine); each interrupted run exits 143 having made
that very step durable, the next one resumes from it, and the final weights are bitwise
those of an uninterrupted run. The same under ``accelerate launch`` with 2 CPU processes.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, run_env
from proc_helpers import PY, Proc

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import torch  # noqa: E402

SCRIPT = str(Path(__file__).parents[1] / "scripts" / "hf_spot_train.py")
TOTAL = 24  # 3 epochs of 8 optimizer steps (16 batches, accumulation 2); 12 with 2 processes


def hf_env(**extra: str) -> dict[str, str]:
    return run_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1", **extra)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_bitwise(a: Path, b: Path) -> None:
    x, y = weights(a), weights(b)
    assert x.keys() == y.keys()
    diff = {k: (x[k] - y[k]).abs().max().item() for k in x if not torch.equal(x[k], y[k])}
    assert not diff, f"resumed weights differ from the uninterrupted run's: {diff}"


def remote_steps(url: str) -> list[int]:
    from spotckpt._remote._store import RemoteStore

    return RemoteStore(url).committed()


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [PY]
    # (--cpu would start one process: accelerate expects mpirun for several CPU processes;
    # --multi_gpu starts them through torch.distributed.run, and use_cpu=True makes it gloo)
    return [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def start(tmp: Path, name: str, nproc: int, *args: str, remote: str | None) -> Proc:
    env = hf_env(SPOTCKPT_GRACE_SECONDS="60", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    if remote:
        env["SPOTCKPT_REMOTE"] = remote
    return Proc([*launcher(nproc), SCRIPT, "--output-dir", str(tmp / name / "out"),
                 "--local-dir", str(tmp / name / "ckpt"), "--out", str(tmp / f"{name}.pt"), *args],
                env=env, start_new_session=True)


def finish(p: Proc, timeout: float = 300) -> int:
    try:
        return p.finish(timeout)
    finally:
        if p.p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def run_interrupted(tmp: Path, s3_remote: str, nproc: int, interruptions: int) -> list[str]:
    rng = random.Random()
    total = TOTAL // nproc
    ref = start(tmp, "ref", nproc, remote=None)  # uninterrupted, alongside the interrupted runs
    stops = sorted(rng.sample(range(2, total - 1), interruptions))
    resumed, seen = None, []
    for i, at in enumerate(stops):
        p = start(tmp, f"run{i}", nproc, "--every", "5", "--wait-at", str(at), remote=s3_remote)
        m = p.wait_for(r"^(resume from step-0*(\d+)|fresh start)$", 180)
        assert (None if m.group(2) is None else int(m.group(2))) == resumed, (m.group(0), resumed)
        pids = [int(p.wait_for(rf"rank {r} pid (\d+)", 180).group(1)) for r in range(nproc)]
        p.wait_for(rf"^waiting at step {at}$", 180)
        for pid in pids:  # every rank (one process: the job itself)
            os.kill(pid, signal.SIGTERM)
        rc = finish(p)
        if nproc == 1:
            assert rc == 143, f"run {i}: exit {rc}\n{p.stderr[-4000:]}"
        else:  # torch.distributed.run reports the ranks' status and exits 1
            assert rc != 0 and re.search(r"exitcode\s*:\s*143", p.stderr), f"run {i}: exit {rc}\n{p.stderr[-4000:]}"
        # the step it was at is durable on the remote before the exit
        assert max(remote_steps(s3_remote)) == at, (remote_steps(s3_remote), at)
        resumed = at
        seen.append(f"SIGTERM at step {at} -> 143, durable")
    last = start(tmp, "last", nproc, "--every", "5", remote=s3_remote)
    last.wait_for(rf"^resume from step-0*{resumed}$", 180)
    assert finish(last) == 0, last.stderr[-4000:]
    assert f"finished step {total}" in last.stdout
    assert finish(ref) == 0, ref.stderr[-3000:]
    assert f"finished step {total}" in ref.stdout
    assert_bitwise(tmp / "last.pt", tmp / "ref.pt")
    return seen


@pytest.mark.slow
def test_trainer_two_sigterms_resume_bitwise_on_empty_dirs(
        tmp_path: Path, s3_remote: str, figure) -> None:
    t0 = time.monotonic()
    seen = run_interrupted(tmp_path, s3_remote, 1, 2)
    figure(f"[transformers] 1 process: {'; '.join(seen)}; final weights bitwise; "
           f"{time.monotonic() - t0:.0f} s")

@pytest.mark.slow
def test_trainer_under_accelerate_launch_two_processes(
        tmp_path: Path, s3_remote: str, figure) -> None:
    t0 = time.monotonic()
    seen = run_interrupted(tmp_path, s3_remote, 2, 1)
    figure(f"[transformers] accelerate launch, 2 CPU processes: {'; '.join(seen)}; final weights "
           f"bitwise; {time.monotonic() - t0:.0f} s")

# -- in-process: the rules around the one line ------------------------------------------------
def tiny_trainer(tmp: Path, spot, max_steps: int = 8, eval_dataset=None, **extra):  # 2 epochs of 4 steps
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    sys.path.insert(0, str(Path(SCRIPT).parent))
    from hf_spot_train import RandomTokens

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    targs = TrainingArguments(output_dir=str(tmp / "out"), max_steps=max_steps, report_to=[], use_cpu=True,
                              seed=0, per_device_train_batch_size=4, disable_tqdm=True,
                              **{"save_strategy": "no", **extra})
    torch.manual_seed(0)
    return Trainer(model=GPT2LMHeadModel(config), args=targs, train_dataset=RandomTokens(16, 8, 50),
                   eval_dataset=eval_dataset, callbacks=[spot])


@pytest.fixture
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_output_dir_inside_the_local_dir_is_refused(tmp_path: Path, _offline: None) -> None:
    from spotckpt import ConfigError
    from spotckpt.integrations.transformers import SpotCheckpoint

    with pytest.raises(ConfigError, match="is inside spotckpt's local_dir"):
        tiny_trainer(tmp_path, SpotCheckpoint(local_dir=tmp_path / "out" / "..", remote=None))


def test_a_checkpoint_not_passed_to_train_is_refused_and_a_finished_job_trains_nothing(
        tmp_path: Path, _offline: None) -> None:
    from spotckpt import ConfigError
    from spotckpt.integrations.transformers import SpotCheckpoint

    local = tmp_path / "ckpt"
    spot = SpotCheckpoint(local_dir=local, remote=None)
    t = tiny_trainer(tmp_path, spot)
    assert spot.resume_path() is None
    t.train(resume_from_checkpoint=spot.resume_path())
    assert [p.name for p in local.iterdir()] == ["step-000000000008"]  # the end is always committed
    assert (local / "step-000000000008" / "trainer_state.json").is_file()

    spot = SpotCheckpoint(local_dir=local, remote=None)
    t = tiny_trainer(tmp_path, spot)
    assert spot.resume_path() == str(local / "step-000000000008")
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint=<callback>.resume_path\(\)"):
        t.train()

    spot = SpotCheckpoint(local_dir=local, remote=None)
    t = tiny_trainer(tmp_path, spot)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    seen: list[int] = []
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append(state.global_step)
    t.add_callback(Steps())
    t.train(resume_from_checkpoint=spot.resume_path())
    assert seen == [] and t.state.global_step == 8
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())  # the restored weights


def test_a_second_trainer_save_at_a_committed_step_does_not_write_into_it(tmp_path: Path, _offline: None) -> None:
    """Our cadence saves at each epoch's last step, then Trainer's epoch strategy saves that step
    again: it must write new files, not truncate the ones the committed step links to."""
    from spotckpt._commit._manifest import verify_dir
    from spotckpt._commit._local import LocalDir
    from spotckpt.integrations.transformers import SpotCheckpoint

    local = tmp_path / "ckpt"
    spot = SpotCheckpoint(every_n_steps=4, local_dir=local, remote=None, keep_last=5)
    tiny_trainer(tmp_path, spot, save_strategy="epoch").train(resume_from_checkpoint=spot.resume_path())
    d = LocalDir(local)
    assert d.committed() == [4, 8]
    for step in (4, 8):
        verify_dir(d.path(step), d.read_manifest(step))
        trainers = tmp_path / "out" / f"checkpoint-{step}"
        shared = [f.name for f in trainers.iterdir()
                  if os.stat(f).st_ino == os.stat(d.path(step) / f.name).st_ino]
        assert not shared, f"Trainer's second save wrote into the committed step-{step}: {shared}"


def test_early_stopping_and_log_history_continue_exactly(tmp_path: Path, _offline: None) -> None:
    """An interruption while EarlyStoppingCallback counts evaluations without improvement: the
    resumed run (a new callback instance, an empty output dir) stops at the same step, with
    the same log history and weights, as an uninterrupted one."""
    import signal as sig

    from transformers import EarlyStoppingCallback, TrainerCallback

    from spotckpt.integrations.transformers import SpotCheckpoint

    sys.path.insert(0, str(Path(SCRIPT).parent))
    from hf_spot_train import RandomTokens

    class SigtermAt(TrainerCallback):
        def __init__(self, at: int | None) -> None:
            self.at = at

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == self.at:
                os.kill(os.getpid(), sig.SIGTERM)  # recorded by spotckpt's handler

    def run(name: str, local: Path, at: int | None):
        spot = SpotCheckpoint(local_dir=local, remote=None, exit_on_interrupt=False)
        extra = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=100,
                     metric_for_best_model="eval_loss", greater_is_better=False, learning_rate=1e-4,
                     logging_steps=1)
        t = tiny_trainer(tmp_path / name, spot, max_steps=12, eval_dataset=RandomTokens(8, 8, 50), **extra)
        t.add_callback(EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=0.05))
        t.callback_handler.callbacks.insert(0, SigtermAt(at))  # before the SpotCheckpoint polls
        t.train(resume_from_checkpoint=spot.resume_path())
        history = [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k}
                   for e in t.state.log_history if "train_loss" not in e]
        return spot.interrupted, t.state.global_step, history, {k: v.clone() for k, v in t.model.state_dict().items()}

    _, ref_step, ref_hist, ref_w = run("ref", tmp_path / "ref-ckpt", None)
    assert 2 < ref_step < 12, "early stopping must end the reference run before max_steps"
    interrupted, step, _, _ = run("a", tmp_path / "ckpt", 2)
    assert interrupted and step == 2
    _, step, hist, w = run("b", tmp_path / "ckpt", None)  # a new Trainer, output dir and callbacks
    assert step == ref_step and hist == ref_hist
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)
