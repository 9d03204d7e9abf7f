"""The watched dir with real third-party training code, unmodified, under ``spotckpt run``
(issue 11): whatever the script writes into its checkpoint dir comes back on a new machine as
one committed, verified snapshot.

- A Transformers ``Trainer`` (tiny GPT-2 from a config, offline) SIGTERMed while it writes a
  ``checkpoint-N/`` dir resumes on an empty dir from a complete checkpoint, ends bitwise equal
  to an uninterrupted run, and the remote never lists a ``checkpoint-N/`` without its
  ``trainer_state.json`` nor more than ``save_total_limit`` of them (findings 3, 4).
- Lightning ``ModelCheckpoint(save_last="link")``: ``last.ckpt`` is a symlink, and
  ``fit(ckpt_path="last")`` on an empty dir resumes from its target (finding 5).
- An AWS-style script that reads a non-empty dir as "resume" (finding 10) and one that resumes
  from its newest file by mtime (finding 6) resume from their newest save, bitwise.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import run_env
from proc_helpers import PY, Proc
from watched_helpers import dir_units, fetch, is_link, remote_set, run_argv, script, signal_tree, tree

HF = script("hf_trainer_train.py")
HF_STEPS, HF_EVERY, HF_LIMIT = 60, 10, 2
# a Trainer checkpoint is usable only with all of these (resume reads each one)
HF_UNIT = {"trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


def hf_env() -> dict[str, str]:
    return run_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def remote_problems(url: str, what: str) -> tuple[list[str], dict[str, set[str]]]:
    """Verify every entry of the remote's newest set; list each Trainer dir that is not a
    whole checkpoint, and a count of them above ``save_total_limit``."""
    entries = remote_set(url)
    problems = []
    for e in entries.values():
        if not is_link(e):
            try:
                fetch(url, e)
            except AssertionError as err:
                problems.append(f"{what}: {err}")
    units = dir_units(entries)
    for d, files in sorted(units.items()):
        if not HF_UNIT <= files:
            problems.append(f"{what}: the remote set lists {d}/ without {sorted(HF_UNIT - files)}")
    if len(units) > HF_LIMIT:
        problems.append(f"{what}: the remote set holds {len(units)} checkpoint dirs {sorted(units)}, "
                        f"save_total_limit is {HF_LIMIT}")
    return problems, units


def ckpt_num(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def local_checkpoints(d: Path) -> tuple[list[int], list[int]]:
    """(complete, partial) checkpoint-N numbers in a local Trainer output dir."""
    done, partial = [], []
    for p in d.glob("checkpoint-*"):
        (done if (p / "trainer_state.json").exists() else partial).append(ckpt_num(p.name))
    return sorted(done), sorted(partial)


def catch_mid_write(out_dir: Path, proc: Proc, first: int, timeout: float = 120) -> tuple[int, bool]:
    """Poll until a new ``checkpoint-N`` (N >= first) exists without ``trainer_state.json``:
    the Trainer is writing it. Returns (N, caught). A save that was complete before the poll
    saw it moves the target to the next one; past the last save but one, give up the
    mid-write hit and return the newest complete one (caught False)."""
    target = first
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        d = out_dir / f"checkpoint-{target}"
        if d.is_dir():
            if not (d / "trainer_state.json").exists():
                return target, True
            if target + HF_EVERY >= HF_STEPS:
                return target, False
            target += HF_EVERY
            continue
        assert proc.p.poll() is None, f"the Trainer ended before checkpoint-{target}\n{proc.stderr[-3000:]}"
        time.sleep(0.0005)
    raise AssertionError(f"no checkpoint-{target} within {timeout} s\n{proc.stdout}\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("hf-ref")
    p = Proc([PY, HF, "--output-dir", str(tmp / "out"), "--out", str(tmp / "ref.pt")], env=hf_env())
    assert p.finish(300) == 0, p.stderr[-3000:]
    assert f"finished step {HF_STEPS}" in p.stdout
    # the unit rule above names what a Trainer of this version really writes
    assert HF_UNIT <= {f.name for f in (tmp / "out" / f"checkpoint-{HF_STEPS}").iterdir()}
    return tmp / "ref.pt"


def test_trainer_sigtermed_while_writing_a_checkpoint_resumes_on_an_empty_dir(
        hf_reference: Path, s3_remote: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    rng = random.Random()
    final = tmp_path / "final.pt"
    problems: list[str] = []
    hits = []

    def check_resume(p: Proc, want: int | None, name: str) -> None:
        m = p.wait_for(r"^(resume from checkpoint-\d+|fresh start)$", 120)
        expect = "fresh start" if want is None else f"resume from checkpoint-{want}"
        assert m.group(1) == expect, f"{name}: {m.group(1)!r}, want {expect!r}; {hits}\n" + \
            "\n".join(problems) + "\n" + p.stderr[-3000:]
        p.wait_for(rf"^first step {want or 0}$", 120)

    def interrupted_round(name: str, resume: int | None, first: int, whole_tree: bool) -> int:
        """Run on an empty dir, check the resume, SIGTERM while a checkpoint-N/ (N >= first)
        is being written, check the remote: returns the newest checkpoint the run completed."""
        local = tmp_path / name
        p = Proc(run_argv(local, s3_remote, PY, HF, "--output-dir", str(local), "--out", str(final),
                          "--step-sleep", "0.03"), env=hf_env())
        check_resume(p, resume, name)
        n, caught = catch_mid_write(local, p, first)
        if whole_tree:  # systemd-style: every process of the job at once, mid-write for sure
            signal_tree(tree(p.pid), signal.SIGTERM)
        else:           # docker-stop-style: PID 1 only; it forwards
            os.kill(p.pid, signal.SIGTERM)
        rc = p.finish(120)
        done, partial = local_checkpoints(local)
        hits.append(f"{name}: SIGTERM {'to the tree' if whole_tree else 'to the supervisor'} at "
                    f"checkpoint-{n} {'mid-write' if caught else '(missed the write)'}, left complete "
                    f"{done} partial {partial}")
        assert rc == 143, f"{name}: exit {rc}\n{p.stderr[-3000:]}"
        bad, units = remote_problems(s3_remote, name)
        problems.extend(bad)
        assert done, f"{name}: no complete checkpoint before the SIGTERM: {hits[-1]}"
        # the final flush had the whole grace: the newest complete checkpoint is durable
        newest_remote = max((ckpt_num(u) for u in units if HF_UNIT <= units[u]), default=None)
        if newest_remote != done[-1]:
            problems.append(f"{name}: newest complete local checkpoint-{done[-1]}, newest whole one on "
                            f"the remote: {newest_remote}")
        return done[-1]

    # 1. fresh start; SIGTERM to the whole tree while checkpoint-N/ is half written
    newest = interrupted_round("instance-a", None, rng.choice([20, 30, 40]), whole_tree=True)
    # 2. a new machine (empty dir) resumes; SIGTERM to the supervisor only, during a later save
    first = min(HF_STEPS - HF_EVERY, newest + HF_EVERY * rng.randint(1, 2))
    newest = interrupted_round("instance-b", newest, first, whole_tree=False)
    # 3. another new machine finishes the job
    c = tmp_path / "instance-c"
    final.unlink(missing_ok=True)
    q = Proc(run_argv(c, s3_remote, PY, HF, "--output-dir", str(c), "--out", str(final)), env=hf_env())
    check_resume(q, newest, "instance-c")
    assert q.finish(300) == 0, q.stderr[-3000:]
    assert f"finished step {HF_STEPS}" in q.stdout
    bad, units = remote_problems(s3_remote, "after the last run")
    problems.extend(bad)
    assert not problems, "\n".join(problems + hits)
    assert f"checkpoint-{HF_STEPS}" in units, sorted(units)
    # Trainer's resume on CPU is bitwise (RNG state, data order and optimizer restored)
    assert tensors_equal(final, hf_reference), "resumed Trainer differs from an uninterrupted run"
    with capsys.disabled():
        print(f"\n[watched] Trainer: {'; '.join(hits)}; {time.monotonic() - t0:.0f} s", flush=True)
