"""Split-brain fencing: two instances of one job on one remote prefix (issue 13, item 3).

Spot platforms do start a replacement while the old instance still runs. Each start claims a
new generation of the job on the remote with the storage's atomic create; the older
instance stops with ``StaleGenerationError`` (exit status 3) at its next commit, before it
can overwrite or delete anything newer, and restore never mixes generations.

Real processes (``tests/scripts/fence_train.py``, no torch) on the real remote of
``remote_url`` (file:// and S3). ``SPOTCKPT_FENCE_RUNS=N`` runs N random timings per store
and attack (default 12 on file:// and 8 per S3 server: 20 per attack over file:// and moto).
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
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

from proc_helpers import PY, Proc, REPO

SCRIPT = str(REPO / "tests" / "scripts" / "fence_train.py")
_RUNS = os.environ.get("SPOTCKPT_FENCE_RUNS")


def runs(remote: str) -> int:
    """Random timings per store and attack: 12 on file://, 8 per S3 server (20 over file://
    and moto, 28 with RGW), or SPOTCKPT_FENCE_RUNS."""
    return int(_RUNS) if _RUNS else 12 if remote.startswith("file://") else 8
TOTAL = 10
EXIT_STALE = 3
STALE_LINE = re.compile(r"^spotckpt\.StaleGenerationError: spotckpt: .*generation \d+.*generation \d+")


def start(tmp: Path, remote: str, tag: str, *args: str) -> Proc:
    env = dict(os.environ, SPOTCKPT_LOCAL_DIR=str(tmp / f"local-{tag}"), SPOTCKPT_REMOTE=remote,
               SPOTCKPT_KEEP_LAST="1000", SPOTCKPT_GRACE_SECONDS="10")
    return Proc([PY, SCRIPT, "--tag", tag, "--total", str(TOTAL), *args], env=env)


def bad_manifests(remote: str, tmp: Path) -> list[str]:
    """Every committed remote manifest whose payload fails its sizes or checksums (each
    object read whole: one GET per file)."""
    from spotckpt._remote._fence import generation_of, payload_dir
    from spotckpt._commit._manifest import hasher

    store = RemoteStore(remote)
    bad = []
    for step in store.committed():
        try:
            m = store.read_manifest(step)
            for e in m.files:
                data = store.cat(f"{payload_dir(step, generation_of(m))}/{e.path}")
                h = hasher(e.algo)
                h.update(data)
                if len(data) != e.size or h.hexdigest() != e.digest:
                    raise ValueError(f"{e.path} fails its checksum")
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


def judge(run: str, remote: str, run_dir: Path, new: Proc, rc_new: int, old: Proc, rc_old: int,
          failures: list[str], names: tuple[str, str]) -> str | None:
    """What both attacks check once the two instances ended: every committed manifest
    verifies, the newer instance finished, the older one stopped with the documented line and
    status (or finished before the newer claim), and a fresh restore gets the newer one's
    final state. Returns "stopped" or "finished"; None after recording a failure."""
    bad = bad_manifests(remote, run_dir)
    if bad:
        failures.append(f"{run}: {len(bad)} committed manifest(s) fail their checksum: {bad[:3]}")
    if rc_new != 0:
        failures.append(f"{run}: {names[0]} exited {rc_new}:\n{new.stderr[-2000:]}")
        return None
    outcome = "stopped" if check_stale(old, rc_old, failures, f"{run}: {names[1]}") else "finished"
    step, digest = fresh_restore(remote, run_dir)
    if (step, digest) != (TOTAL, final(new)):
        failures.append(f"{run}: a fresh restore got step {step} {digest}, {names[0]} ended at "
                        f"step {TOTAL} {final(new)} ({names[1]}: {final(old)})")
    return outcome


@pytest.mark.slow
def test_zombie_and_replacement(remote_url: str, tmp_path: Path) -> None:
    """The old instance (Z) pauses, a replacement (R) starts on an empty local dir and runs
    to the end; Z goes on at a random moment. The replacement's lineage wins, Z stops with
    the documented line and status, and every committed manifest verifies."""
    rng = random.Random(os.environ.get("SPOTCKPT_FENCE_SEED", "13"))
    failures: list[str] = []
    stopped = finished = 0
    t0 = time.monotonic()
    for i in range(runs(remote_url)):
        remote = remote_for(remote_url, tmp_path, i)
        run_dir = tmp_path / f"run{i}"
        gate = run_dir / "go"
        run_dir.mkdir()
        k = rng.randint(1, TOTAL - 4)
        z = start(run_dir, remote, "Z", "--sleep", f"{rng.uniform(0.005, 0.02):.4f}",
                  "--pause-at", str(k), "--pause-file", str(gate))
        r = start(run_dir, remote, "R", "--sleep", f"{rng.uniform(0.0, 0.004):.4f}",
                  "--start-file", str(run_dir / "start-r"))  # imports while Z starts
        z.wait_for(rf"^done {k}$", 60)
        r.wait_for("^ready$", 60)
        (run_dir / "start-r").touch()
        if rng.random() < 0.25:
            gate.touch()  # Z goes on while R starts: before, during or after its claim
            generation(r)
        else:
            generation(r)
            time.sleep(rng.uniform(0.0, 0.3))
            gate.touch()
        rc_r, rc_z = r.finish(120), z.finish(120)
        outcome = judge(f"run {i}", remote, run_dir, r, rc_r, z, rc_z, failures, ("the replacement", "the zombie"))
        stopped += outcome == "stopped"
        finished += outcome == "finished"
    print(f"[fence] zombie+replacement on {remote_url.split(':')[0]}: {runs(remote_url)} runs in "
          f"{time.monotonic() - t0:.1f} s, zombie stopped (exit {EXIT_STALE}) {stopped}, done before "
          f"the claim {finished}, failures {len(failures)}")
    assert not failures, "\n".join(failures[:5])


@pytest.mark.slow
def test_double_launch(remote_url: str, tmp_path: Path) -> None:
    """The same job launched twice at once (random offsets and speeds): the instance with
    the newer generation wins, the other stops with the documented line and status (or
    finished before the newer claim), and every committed manifest verifies."""
    rng = random.Random(os.environ.get("SPOTCKPT_FENCE_SEED", "31"))
    failures: list[str] = []
    stopped = finished = 0
    t0 = time.monotonic()
    for i in range(runs(remote_url)):
        remote = remote_for(remote_url, tmp_path, i)
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        a = start(run_dir, remote, "A", "--sleep", f"{rng.uniform(0.0, 0.02):.4f}",
                  "--start-file", str(run_dir / "start-a"))
        b = start(run_dir, remote, "B", "--sleep", f"{rng.uniform(0.0, 0.02):.4f}",
                  "--start-file", str(run_dir / "start-b"))
        a.wait_for("^ready$", 60)
        b.wait_for("^ready$", 60)
        (run_dir / "start-a").touch()  # at once, give or take a random offset
        time.sleep(rng.uniform(0.0, 0.3))
        (run_dir / "start-b").touch()
        ga, gb = generation(a), generation(b)
        rc_a, rc_b = a.finish(120), b.finish(120)
        if ga is None or gb is None or ga == gb:
            failures.append(f"run {i}: generations {ga} and {gb}")
            continue
        (new, rc_new), (old, rc_old) = sorted([(a, rc_a), (b, rc_b)], key=lambda x: -generation(x[0]))
        outcome = judge(f"run {i}", remote, run_dir, new, rc_new, old, rc_old, failures,
                        ("the newer instance", "the older instance"))
        stopped += outcome == "stopped"
        finished += outcome == "finished"
    print(f"[fence] double launch on {remote_url.split(':')[0]}: {runs(remote_url)} runs in "
          f"{time.monotonic() - t0:.1f} s, older stopped (exit {EXIT_STALE}) {stopped}, done before "
          f"the newer claim {finished}, failures {len(failures)}")
    assert not failures, "\n".join(failures[:5])


# -- unit level: retention, restore, stores without conditional writes ----------------------
def _writer(tmp: Path, name: str, remote: str, keep_last: int = 1):
    from spotckpt._sync._engine import Engine
    from spotckpt._remote._fence import claim
    from spotckpt._sync._syncer import Syncer

    store = RemoteStore(remote)
    fence = claim(store)
    local = LocalDir(tmp / name)
    local.root.mkdir(parents=True)
    syncer = Syncer(local, store, keep_last=keep_last, mirror=False, fence=fence)
    syncer.start()
    engine = Engine(local, syncer=syncer, keep_last=keep_last)
    engine.generation = fence.generation
    return engine, syncer, fence


def _commit(engine, step: int, data: bytes) -> None:
    from spotckpt._commit._manifest import FileEntry, file_digest

    def write(tmp: Path, ready) -> list:
        (tmp / "state.bin").write_bytes(data)
        return [FileEntry("state.bin", len(data), file_digest(tmp / "state.bin"))]
    engine.commit(step, write, framework="test", serializer="pickle")


def _restored(remote: str, tmp: Path, *, start: bool = False) -> tuple[int, bytes, int]:
    """(step, payload, generation) a fresh restore takes: as `spotckpt pull` does, or with
    ``start`` after a new claim, as a new start does."""
    from spotckpt._sync._restore import restore_newest
    from spotckpt._remote._fence import claim, generation_of

    store = RemoteStore(remote)
    if start:
        claim(store)
    local = LocalDir(tmp)
    local.root.mkdir(parents=True)
    step, m, _ = restore_newest(local, store)
    return step, (local.path(step) / "state.bin").read_bytes(), generation_of(m)


def test_retention_never_deletes_a_newer_generations_commits(remote_url: str, tmp_path: Path) -> None:
    from spotckpt import StaleGenerationError

    old, old_sync, _ = _writer(tmp_path, "old", remote_url)
    for s in (1, 2):
        _commit(old, s, b"old %d" % s)
    assert old_sync.flush(30)
    new, new_sync, new_fence = _writer(tmp_path, "new", remote_url, keep_last=2)
    for s in (3, 4):
        _commit(new, s, b"new %d" % s)
    assert new_sync.flush(30)  # (its retention removed the older generation's steps)
    _commit(old, 10, b"old 10")  # the stale instance's commit, then its retention
    assert not old_sync.flush(30)
    assert isinstance(old_sync.stale, StaleGenerationError)
    assert "generation 1" in str(old_sync.stale) and "generation 2" in str(old_sync.stale)
    with pytest.raises(StaleGenerationError):
        old_sync._remote_retention(10)  # keep_last=1 would delete step 3: checked again first
    store = RemoteStore(remote_url)
    assert store.committed() == [3, 4]
    assert not bad_manifests(remote_url, tmp_path)
    assert _restored(remote_url, tmp_path / "fresh", start=True) == (4, b"new 4", new_fence.generation)
    old_sync.close(0)
    new_sync.close(5)


def test_restore_never_mixes_generations(remote_url: str, tmp_path: Path) -> None:
    """A stale instance's commit already sent when the newer claim landed (its check passed
    before) is a consistent checkpoint of its own generation, with its own payload keys: a
    restore prefers the newest generation's checkpoint even at a lower step, and the newer
    generation replaces that step's manifest when it gets there."""
    old, old_sync, old_fence = _writer(tmp_path, "old", remote_url)
    _commit(old, 1, b"old 1")
    assert old_sync.flush(30)
    new, new_sync, _ = _writer(tmp_path, "new", remote_url)
    old_fence.check = lambda what: None  # the request in flight at the claim
    _commit(old, 5, b"old 5")
    assert old_sync.flush(30)
    _commit(new, 3, b"new 3")
    assert new_sync.flush(30)
    assert RemoteStore(remote_url).committed()[-1] == 5
    assert _restored(remote_url, tmp_path / "r1") == (3, b"new 3", 2)
    _commit(new, 5, b"new 5")  # the same step as the stale commit: the newer one replaces it
    assert new_sync.flush(30)
    assert _restored(remote_url, tmp_path / "r2") == (5, b"new 5", 2)
    assert _restored(remote_url, tmp_path / "r3", start=True) == (5, b"new 5", 2)
    assert not bad_manifests(remote_url, tmp_path)
    old_sync.close(0)
    new_sync.close(5)


def test_a_store_without_conditional_writes_gets_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    from spotckpt._remote._fence import claim

    store = RemoteStore(f"memory://fence-{os.getpid()}-{time.time_ns()}/job/")
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        first, second = claim(store), claim(store)
    lines = [r.getMessage() for r in caplog.records if "atomic create" in r.getMessage()]
    assert len(lines) == 2 and "\n" not in lines[0], lines  # one line per start
    assert not first.enforced and (first.generation, second.generation) == (1, 2)
    with pytest.raises(spotckpt.StaleGenerationError):
        first.check("commit")  # without the atomic create the check still stops most zombies


def test_zombie_supervisor_never_overwrites_a_newer_file_set(remote_url: str, tmp_path: Path) -> None:
    """`spotckpt run` of an unmodified script: the old supervisor goes on mirroring after a
    replacement started; the replacement's file set stays the newest, the old one stops."""
    from conftest import remote_files

    writer = tmp_path / "writer.py"
    writer.write_text(
        "import os, sys, time\n"
        "tag, n = sys.argv[1], int(sys.argv[2])\n"
        "d = os.environ['SPOTCKPT_LOCAL_DIR']\n"
        "for i in range(n):\n"
        "    with open(os.path.join(d, 'model.txt.tmp'), 'w') as f: f.write(f'{tag} {i}')\n"
        "    os.replace(os.path.join(d, 'model.txt.tmp'), os.path.join(d, 'model.txt'))\n"
        "    print('wrote', i, flush=True)\n"
        "    if os.path.exists(sys.argv[3]):\n"
        "        time.sleep(0.05)\n"
        "    else:\n"
        "        while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n")
    gate = tmp_path / "go"

    def sup(tag: str, n: int) -> Proc:
        return Proc([PY, "-m", "spotckpt", "run", "--local-dir", str(tmp_path / tag), "--remote", remote_url,
                     "--scan-interval", "0.1", "--", PY, str(writer), tag, str(n), str(gate)])
    z = sup("Z", 200)
    z.wait_for(r"^wrote 0$", 60)
    from proc_helpers import wait_until
    wait_until(lambda: remote_files(remote_url), 60, "the old supervisor's first file set")
    r = sup("R", 5)
    gate.touch()
    assert r.finish(120) == 0, r.stderr
    rc = z.finish(120)
    entry = remote_files(remote_url)["model.txt"]
    assert RemoteStore(remote_url).cat(entry.key) == b"R 4"  # the old code: the zombie's version
    lines = [line for line in z.err if STALE_LINE.search(line)]
    assert rc == EXIT_STALE and len(lines) == 1, (rc, z.stderr[-3000:])


def test_a_server_that_ignores_if_none_match_gets_one_warning(s3_remote: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts the claim's second conditional create does not enforce
    conditional writes. Simulated on the real server by sending the PUTs without the
    header (what such a server sees is what it ignores)."""
    from spotckpt._remote._fence import claim

    store = RemoteStore(s3_remote)

    def drop(params: dict, **kw: object) -> None:
        params.pop("IfNoneMatch", None)
    store.fast.client.meta.events.register("provide-client-params.s3.PutObject", drop)
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        fence = claim(store)
    lines = [r.getMessage() for r in caplog.records if "If-None-Match" in r.getMessage()]
    assert len(lines) == 1 and not fence.enforced, lines
    assert claim(RemoteStore(s3_remote)).enforced  # the real server does enforce it
