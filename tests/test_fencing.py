"""Split-brain fencing: two instances of one job on one remote prefix (issue 13, item 3).

Spot platforms do start a replacement while the old instance still runs. Each start claims a
new generation of the job on the remote with the storage's atomic create; the older
instance stops with ``StaleGenerationError`` (exit status 3) at its next commit, before it
can overwrite or delete anything newer, and restore never mixes generations.

Real processes (``tests/scripts/fence_train.py``, no torch) on the real remote of
``remote_url`` (file:// and S3). ``SPOTCKPT_FENCE_RUNS=N`` runs N random timings per store
and attack (default 10: 20 per attack over file:// and moto, more with RGW).
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path

import pytest

import spotckpt
from spotckpt._engine import _download
from spotckpt._local import LocalDir
from spotckpt._manifest import verify_dir
from spotckpt._store import RemoteStore

from proc_helpers import PY, Proc, REPO

SCRIPT = str(REPO / "tests" / "scripts" / "fence_train.py")
RUNS = int(os.environ.get("SPOTCKPT_FENCE_RUNS") or 10)
TOTAL = 30
EXIT_STALE = 3
STALE_LINE = re.compile(r"^spotckpt\.StaleGenerationError: spotckpt: .*generation \d+.*generation \d+")


def start(tmp: Path, remote: str, tag: str, *args: str) -> Proc:
    env = dict(os.environ, SPOTCKPT_LOCAL_DIR=str(tmp / f"local-{tag}"), SPOTCKPT_REMOTE=remote,
               SPOTCKPT_KEEP_LAST="1000", SPOTCKPT_GRACE_SECONDS="10")
    return Proc([PY, SCRIPT, "--tag", tag, "--total", str(TOTAL), *args], env=env)


def bad_manifests(remote: str, tmp: Path) -> list[str]:
    """Every committed remote manifest whose payload fails its sizes or checksums."""
    store = RemoteStore(remote)
    local = LocalDir(tmp / "verify")
    local.root.mkdir(parents=True, exist_ok=True)
    bad = []
    for step in store.committed():
        try:
            m = store.read_manifest(step)
            d = _download(store, local, step, m)
            try:
                verify_dir(d, m)
            finally:
                import shutil
                shutil.rmtree(d, ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - collected
            bad.append(f"step {step}: {e}")
    return bad


def fresh_restore(remote: str, tmp: Path) -> tuple[int | None, str]:
    """What a new instance on an empty local dir restores: (step, digest of the state)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fence_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    state = {"who": "", "w": 0, "blob": b""}
    ck = spotckpt.Checkpointer(state, local_dir=tmp / "fresh", remote=remote)
    ck.open()
    try:
        return ck.restored_step, mod.digest(state)
    finally:
        ck.close(raise_errors=False)


def final(p: Proc) -> str | None:
    for line in p.out:
        if line.startswith("final "):
            return line.split()[2]
    return None


def generation(p: Proc) -> int | None:
    m = p.wait_for(r"^generation (\S+)$", 60)
    return None if m.group(1) == "None" else int(m.group(1))


def check_stale(p: Proc, rc: int, failures: list[str], what: str) -> bool:
    """An instance that lost: exit 0 (done before the newer claim) or the documented stop."""
    if rc == 0:
        return False
    lines = [line for line in p.err if line.strip()]
    stale = [line for line in lines if STALE_LINE.search(line)]
    if rc != EXIT_STALE or len(stale) != 1 or any("Traceback" in line for line in lines):
        failures.append(f"{what}: exit {rc}, stderr:\n" + "\n".join(lines[-15:]))
    return True


def remote_for(base: str, tmp: Path, i: int) -> str:
    return f"{base}z{i}/" if base.startswith("s3://") else f"file://{tmp / f'remote{i}'}/"


def test_zombie_and_replacement(remote_url: str, tmp_path: Path) -> None:
    """The old instance (Z) pauses, a replacement (R) starts on an empty local dir and runs
    to the end; Z goes on at a random moment. The replacement's lineage wins, Z stops with
    the documented line and status, and every committed manifest verifies."""
    rng = random.Random(os.environ.get("SPOTCKPT_FENCE_SEED", "13"))
    failures: list[str] = []
    stopped = finished = 0
    t0 = time.monotonic()
    for i in range(RUNS):
        remote = remote_for(remote_url, tmp_path, i)
        run_dir = tmp_path / f"run{i}"
        gate = run_dir / "go"
        run_dir.mkdir()
        k = rng.randint(1, TOTAL - 8)
        z = start(run_dir, remote, "Z", "--sleep", f"{rng.uniform(0.005, 0.02):.4f}",
                  "--pause-at", str(k), "--pause-file", str(gate))
        z.wait_for(rf"^done {k}$", 60)
        r = start(run_dir, remote, "R", "--sleep", f"{rng.uniform(0.0, 0.004):.4f}")
        if rng.random() < 0.25:
            gate.touch()  # Z goes on while R starts: before, during or after its claim
            generation(r)
        else:
            generation(r)
            time.sleep(rng.uniform(0.0, 0.3))
            gate.touch()
        rc_r, rc_z = r.finish(120), z.finish(120)
        if rc_r != 0:
            failures.append(f"run {i}: the replacement exited {rc_r}:\n{r.stderr[-2000:]}")
            continue
        if check_stale(z, rc_z, failures, f"run {i}: the zombie"):
            stopped += 1
        else:
            finished += 1
        bad = bad_manifests(remote, run_dir)
        if bad:
            failures.append(f"run {i}: {len(bad)} committed manifest(s) fail their checksum: {bad[:3]}")
        step, digest = fresh_restore(remote, run_dir)
        if (step, digest) != (TOTAL, final(r)):
            failures.append(f"run {i}: a fresh restore got step {step} {digest}, the replacement "
                            f"ended at step {TOTAL} {final(r)} (zombie: {final(z)})")
    print(f"[fence] zombie+replacement on {remote_url.split(':')[0]}: {RUNS} runs in "
          f"{time.monotonic() - t0:.1f} s, zombie stopped (exit {EXIT_STALE}) {stopped}, done before "
          f"the claim {finished}, failures {len(failures)}")
    assert not failures, "\n".join(failures[:5])


def test_double_launch(remote_url: str, tmp_path: Path) -> None:
    """The same job launched twice at once (random offsets and speeds): the instance with
    the newer generation wins, the other stops with the documented line and status (or
    finished before the newer claim), and every committed manifest verifies."""
    rng = random.Random(os.environ.get("SPOTCKPT_FENCE_SEED", "31"))
    failures: list[str] = []
    stopped = finished = 0
    t0 = time.monotonic()
    for i in range(RUNS):
        remote = remote_for(remote_url, tmp_path, i)
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        a = start(run_dir, remote, "A", "--sleep", f"{rng.uniform(0.0, 0.02):.4f}")
        time.sleep(rng.uniform(0.0, 0.3))
        b = start(run_dir, remote, "B", "--sleep", f"{rng.uniform(0.0, 0.02):.4f}")
        ga, gb = generation(a), generation(b)
        rc_a, rc_b = a.finish(120), b.finish(120)
        bad = bad_manifests(remote, run_dir)
        if bad:
            failures.append(f"run {i}: {len(bad)} committed manifest(s) fail their checksum: {bad[:3]}")
        if ga is None or gb is None or ga == gb:
            failures.append(f"run {i}: generations {ga} and {gb}")
            continue
        (new, rc_new), (old, rc_old) = sorted([(a, rc_a), (b, rc_b)], key=lambda x: -generation(x[0]))
        if rc_new != 0:
            failures.append(f"run {i}: the newer instance exited {rc_new}:\n{new.stderr[-2000:]}")
            continue
        if check_stale(old, rc_old, failures, f"run {i}: the older instance"):
            stopped += 1
        else:
            finished += 1
        step, digest = fresh_restore(remote, run_dir)
        if (step, digest) != (TOTAL, final(new)):
            failures.append(f"run {i}: a fresh restore got step {step} {digest}, the newer instance "
                            f"ended at step {TOTAL} {final(new)}")
    print(f"[fence] double launch on {remote_url.split(':')[0]}: {RUNS} runs in "
          f"{time.monotonic() - t0:.1f} s, older stopped (exit {EXIT_STALE}) {stopped}, done before "
          f"the newer claim {finished}, failures {len(failures)}")
    assert not failures, "\n".join(failures[:5])
