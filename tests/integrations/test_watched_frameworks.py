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
from watched_helpers import (dir_units, fetch, is_link, kill_tree, remote_set, run_argv, script, signal_tree,
                             tree)

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

HF = script("hf_trainer_train.py")
HF_STEPS, HF_EVERY, HF_LIMIT = 60, 10, 2
# a Trainer checkpoint is usable only with all of these (resume reads each one)
HF_UNIT = {"trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


@pytest.fixture(autouse=True)
def _no_leftovers() -> None:
    """A failed assertion must not leave a supervised run behind."""
    yield
    for p in _started:
        if p.p.poll() is None:
            kill_tree(p.p)
    _started.clear()


_started: list[Proc] = []


def start(argv: list[str], env: dict[str, str]) -> Proc:
    p = Proc(argv, env=env)
    _started.append(p)
    return p


def hf_env() -> dict[str, str]:
    return run_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def remote_problems(url: str, what: str, limit: int = HF_LIMIT) -> tuple[list[str], dict[str, set[str]]]:
    """Verify every entry of the remote's newest set; list each Trainer dir that is not a
    whole checkpoint, and a count of them above ``limit`` (``save_total_limit``, or as many
    as the Trainer left itself when it was killed between a save and its rotation)."""
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
    if len(units) > limit:
        problems.append(f"{what}: the remote set holds {len(units)} checkpoint dirs {sorted(units)}, "
                        f"the limit is {limit}")
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
    p = start([PY, HF, "--output-dir", str(tmp / "out"), "--out", str(tmp / "ref.pt")], env=hf_env())
    assert p.finish(300) == 0, p.stderr[-3000:]
    assert f"finished step {HF_STEPS}" in p.stdout
    # the unit rule above names what a Trainer of this version really writes
    assert HF_UNIT <= {f.name for f in (tmp / "out" / f"checkpoint-{HF_STEPS}").iterdir()}
    return tmp / "ref.pt"


def test_trainer_sigtermed_while_writing_a_checkpoint_resumes_on_an_empty_dir(
        hf_reference: Path, s3_remote: str, tmp_path: Path, figure) -> None:
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
        is being written, check the remote: returns the newest checkpoint it holds whole."""
        local = tmp_path / name
        p = start(run_argv(local, s3_remote, PY, HF, "--output-dir", str(local), "--out", str(final),
                          "--step-sleep", "0.03"), env=hf_env())
        check_resume(p, resume, name)
        n, caught = catch_mid_write(local, p, first)
        sent_ns = time.time_ns()
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
        # A Trainer killed between a save and its rotation leaves save_total_limit + 1 dirs
        bad, units = remote_problems(s3_remote, name, limit=max(HF_LIMIT, len(done)))
        problems.extend(bad)
        assert done, f"{name}: no complete checkpoint before the SIGTERM: {hits[-1]}"
        problems.extend(f"{name}: the remote set holds {u}/, not a complete local checkpoint {done}"
                        for u in units if ckpt_num(u) not in done)
        # The final flush had the whole grace: every checkpoint complete before the signal is
        # durable. One the Trainer completed in the moment between the signal and its
        # forwarding may stay out: its marker was closed after the supervisor's last look at
        # the writers, and a file closed by the kill looks the same (docs/supervisor.md).
        closed = [d for d in done
                  if (local / f"checkpoint-{d}" / "trainer_state.json").stat().st_mtime_ns < sent_ns - 500_000_000]
        newest_remote = max((ckpt_num(u) for u in units if HF_UNIT <= units[u]), default=None)
        if newest_remote not in done or (closed and newest_remote < closed[-1]):
            problems.append(f"{name}: newest complete local checkpoint-{done[-1]} (closed before the signal: "
                            f"{closed[-1] if closed else None}), newest whole one on "
                            f"the remote: {newest_remote}; the supervisor said:\n{p.stderr[-4000:]}")
        return newest_remote if newest_remote is not None else done[-1]  # where the next machine resumes

    # 1. fresh start; SIGTERM to the whole tree while checkpoint-N/ is half written
    newest = interrupted_round("instance-a", None, rng.choice([20, 30, 40]), whole_tree=True)
    # 2. a new machine (empty dir) resumes; SIGTERM to the supervisor only, during a later save
    first = min(HF_STEPS - HF_EVERY, newest + HF_EVERY * rng.randint(1, 2))
    newest = interrupted_round("instance-b", newest, first, whole_tree=False)
    # 3. another new machine finishes the job
    c = tmp_path / "instance-c"
    final.unlink(missing_ok=True)
    q = start(run_argv(c, s3_remote, PY, HF, "--output-dir", str(c), "--out", str(final)), env=hf_env())
    check_resume(q, newest, "instance-c")
    assert q.finish(300) == 0, q.stderr[-3000:]
    assert f"finished step {HF_STEPS}" in q.stdout
    bad, units = remote_problems(s3_remote, "after the last run")
    problems.extend(bad)
    assert not problems, "\n".join(problems + hits)
    assert f"checkpoint-{HF_STEPS}" in units, sorted(units)
    # Trainer's resume on CPU is bitwise (RNG state, data order and optimizer restored)
    assert tensors_equal(final, hf_reference), "resumed Trainer differs from an uninterrupted run"
    figure(f"[watched] Trainer: {'; '.join(hits)}; {time.monotonic() - t0:.0f} s")

# -- Lightning ModelCheckpoint(save_last="link") -------------------------------------------------
LT = script("lightning_modelckpt_train.py")
LT_STEPS = 96  # 3 epochs of 32 steps; a checkpoint every 10


def step_of(name: str) -> int:
    m = re.search(r"step=(\d+)\.ckpt$", name)
    assert m, name
    return int(m.group(1))


def test_lightning_last_link_resumes_from_its_target_on_an_empty_dir(
        s3_remote: str, tmp_path: Path, figure) -> None:
    t0 = time.monotonic()
    ref = start([PY, LT, "--ckpt-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.pt")], env=run_env())
    assert ref.finish(300) == 0, ref.stderr[-3000:]

    a = tmp_path / "instance-a"
    target = random.choice([20, 30, 40, 50, 60])
    p = start(run_argv(a, s3_remote, PY, LT, "--ckpt-dir", str(a), "--sleep", "0.03"), env=run_env())
    p.wait_for("^fresh start$", 120)

    def linked_step() -> int | None:
        try:
            return step_of(os.readlink(a / "last.ckpt"))
        except OSError:
            return None

    end = time.monotonic() + 120
    while (linked_step() or 0) < target:
        assert time.monotonic() < end and p.p.poll() is None, p.stderr[-3000:]
        time.sleep(0.005)
    time.sleep(random.uniform(0, 0.2))  # somewhere in the steps after that save
    os.kill(p.pid, signal.SIGTERM)
    rc = p.finish(120)
    assert (a / "last.ckpt").is_symlink()
    link = os.readlink(a / "last.ckpt")
    step = step_of(link)
    assert step < LT_STEPS, p.stdout

    # a new machine: fit(ckpt_path="last") must find last.ckpt and load its target
    b = tmp_path / "instance-b"
    q = start(run_argv(b, s3_remote, PY, LT, "--ckpt-dir", str(b), "--out", str(tmp_path / "final.pt")),
             env=run_env())
    assert q.finish(300) == 0, q.stderr[-3000:]
    first = q.wait_for(r"^(fresh start|resumed at step \d+)$", 1).group(1)
    assert first == f"resumed at step {step}", \
        f"restart on an empty dir: {first!r}, last.ckpt -> {link} was durable\n{q.stderr[-3000:]}"
    assert (b / "last.ckpt").is_symlink() or (b / "last.ckpt").exists()
    assert tensors_equal(tmp_path / "final.pt", tmp_path / "ref.pt")

    # the remote lists the link and its target; Lightning exited 0 after the forwarded SIGTERM,
    # and the supervisor says "interrupted" anyway (finding 11)
    entries = remote_set(s3_remote)
    assert rc == 143, f"spotckpt run exited {rc} after a forwarded SIGTERM\n{p.stderr[-2000:]}"
    assert entries.get("last.ckpt", {}).get("link") is not None, sorted(entries)
    fetch(s3_remote, entries[entries["last.ckpt"]["link"]])
    figure(f"[watched] Lightning: SIGTERM after last.ckpt -> {link}, resumed at step {step}, bitwise; "
           f"{time.monotonic() - t0:.0f} s")

# -- AWS-style scripts: "non-empty dir means resume", "newest file by mtime" -------------------
AWS = script("aws_style_epochs.py")


@pytest.mark.parametrize("mode", ["listdir", "mtime"])
def test_aws_style_script_resumes_from_its_newest_save_on_an_empty_dir(
        mode: str, s3_remote: str, tmp_path: Path, figure) -> None:
    t0 = time.monotonic()
    args = ["--mode", mode, "--epochs", "8"]
    ref = start([PY, AWS, "--checkpoint-dir", str(tmp_path / "ref"), *args, "--out", str(tmp_path / "ref.pt")],
               env=run_env())
    assert ref.finish(120) == 0, ref.stderr[-3000:]

    # mtime mode: stop with the newest save in slot 0 or 1, so name order is not recency order
    stop = random.choice([3, 4, 6] if mode == "mtime" else [2, 3, 4, 5, 6])
    a = tmp_path / "instance-a"
    p = start(run_argv(a, s3_remote, PY, AWS, "--checkpoint-dir", str(a), *args, "--sleep", "0.6"), env=run_env())
    first = p.wait_for(r"^(fresh start|resumed from .*)$", 120).group(1)
    assert first == "fresh start", f"a fresh start on an empty dir saw {first!r} (finding 10)\n{p.stderr[-3000:]}"
    p.wait_for(rf"^saved epoch {stop}$", 120)
    os.kill(p.pid, signal.SIGTERM)  # lands in the next epoch's sleep, before its save
    rc = p.finish(120)
    saved = [int(m.group(1)) for line in p.out if (m := re.match(r"^saved epoch (\d+)$", line))]
    assert rc == 143, f"exit {rc}\n{p.stderr[-3000:]}"
    newest = saved[-1]
    assert newest < 8
    # the set lists the script's files with their mtimes (the restart below needs them: finding 6)
    entries = remote_set(s3_remote)
    local_files = {f.name: f.stat().st_mtime_ns for f in a.glob("*.pt")}
    mtimes = {k: e.get("mtime_ns") for k, e in entries.items() if k.endswith(".pt")}

    b = tmp_path / "instance-b"
    q = start(run_argv(b, s3_remote, PY, AWS, "--checkpoint-dir", str(b), *args, "--out", str(tmp_path / "final.pt")),
             env=run_env())
    assert q.finish(120) == 0, q.stderr[-3000:]
    got = q.wait_for(r"^(fresh start|resumed from .*)$", 1).group(1)
    name = f"model-epoch-{newest:03d}.pt" if mode == "listdir" else f"slot-{newest % 3}.pt"
    assert got == f"resumed from {name} at epoch {newest}", f"newest save was epoch {newest}: {got!r}"
    assert tensors_equal(tmp_path / "final.pt", tmp_path / "ref.pt")
    assert mtimes == local_files, f"the remote set after the SIGTERM {mtimes}, the local dir {local_files}"
    figure(f"[watched] AWS-style ({mode}): stopped after epoch {newest}, resumed there, bitwise; "
           f"{time.monotonic() - t0:.0f} s")