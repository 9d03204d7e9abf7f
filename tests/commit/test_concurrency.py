"""Two training processes started on the same local dir by mistake: one wins (the lock in
``trainer.lock`` in the local dir's state dir, ``LocalDir(dir).meta``), the other exits at once with a clear message
naming the dir and the holder; nothing is corrupted. Real processes, real flock."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_env

from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import verify_dir

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

SCRIPT = str(REPO / "tests" / "scripts" / "chaos_train.py")


def start(local: Path, remote: str, out: Path, *args: str) -> subprocess.Popen:
    env = run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=remote)
    return subprocess.Popen([sys.executable, SCRIPT, "--out", str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_dir(local: Path) -> list[int]:
    d = LocalDir(local)
    steps = d.committed()
    for s in steps:
        verify_dir(d.path(s), d.read_manifest(s))
    assert not [p for p in local.iterdir() if p.name.startswith(".step-")]
    return steps


def test_second_process_on_same_dir_exits_clearly(tmp_path: Path) -> None:
    local, remote = tmp_path / "ck", f"file://{tmp_path / 'remote'}/"
    # A holds the dir for 8 s after its restore: long enough for B to start, even on a busy machine
    a = start(local, remote, tmp_path / "a.json", "--total", "30", "--hold", "8")
    assert a.stdout.readline().startswith("resumed None")  # A holds the lock and trains
    t0 = time.monotonic()
    b = start(local, remote, tmp_path / "b.json", "--total", "30")
    _, err_b = b.communicate(timeout=60)
    took = time.monotonic() - t0
    assert b.returncode not in (0, None)
    last = err_b.strip().splitlines()[-1]
    assert "CheckpointLockedError" in last and f"'{local}' is in use by pid {a.pid}" in last, err_b[-2000:]
    assert took < 15 and a.poll() is None  # B gave up at once; A is unaffected
    out_a, err_a = a.communicate(timeout=120)
    assert a.returncode == 0, err_a[-2000:]
    assert not (tmp_path / "b.json").exists()
    assert check_dir(local)[-1] == 30
    assert json.loads((tmp_path / "a.json").read_text())["step"] == 30


def test_simultaneous_starts_exactly_one_wins(tmp_path: Path) -> None:
    for round_ in range(2):
        local, remote = tmp_path / f"ck{round_}", f"file://{tmp_path / f'remote{round_}'}/"
        procs = [start(local, remote, tmp_path / f"{round_}-{i}.json", "--total", "20", "--hold", "6")
                 for i in range(2)]
        results = [p.communicate(timeout=120) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes[0] == 0 and codes[1] != 0, (codes, [r[1][-500:] for r in results])
        loser = results[[p.returncode for p in procs].index(codes[1])]
        assert "is in use by pid" in loser[1], loser[1][-2000:]
        assert check_dir(local)[-1] == 20
