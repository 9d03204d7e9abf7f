"""Crash anywhere: a training process that saves at every step is SIGKILLed at random
moments (during startup and restore, snapshot, write, local commit, upload, manifest upload,
retention), again and again, on the S3 test server.

After every kill:
- the remote holds no manifest whose files are missing or differ (size and SHA-256);
- the killed local dir holds no committed checkpoint that fails verification;
- the restart, with an empty local dir as on a new machine, resumes from the newest remote
  checkpoint, with no quarantine.
At the end the model equals an uninterrupted run's, bit for bit.

``SPOTCKPT_CHAOS_ITERATIONS`` sets the number of kills (50 in ``make test``, 500 in
``make chaos``). The RGW leg (see conftest's ``RGW_MODULES``) runs a fifth of them: the
kills probe spotckpt's commit protocol, the leg checks it holds on a real server.
"""
from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chaoslib import events, orphan_keys, remote_audit, unnamed
from conftest import REPO, S3Server, run_env
from spotckpt._errors import CorruptCheckpointError
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import MANIFEST, verify_dir

ITERATIONS = int(os.environ.get("SPOTCKPT_CHAOS_ITERATIONS", "50"))
SCRIPT = str(REPO / "tests" / "scripts" / "chaos_train.py")
BIG = 10**9
# where the background uploader was when the kill landed, from its last event
PHASES = {"restore": "training, before the first upload", "upload_start": "uploading payload or manifest",
          "upload_done": "remote retention or idle", "remote_deleted": "remote retention or idle",
          "remote_orphan_deleted": "remote retention or idle"}
SYNC_EVENTS = set(PHASES)


def local_audit(root: Path) -> list[int]:
    """Every committed checkpoint in a killed process's local dir must verify."""
    local = LocalDir(root)
    local.clean_temp()
    steps = local.committed()
    for s in steps:
        try:
            verify_dir(local.path(s), local.read_manifest(s))
        except CorruptCheckpointError as e:  # pragma: no cover - this is the failure we hunt
            raise AssertionError(f"killed process left a bad committed checkpoint: {e}") from None
    return steps


def wait_for_line(path: Path, prefix: str, proc: subprocess.Popen, timeout: float = 60) -> str | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    raise AssertionError(f"no {prefix!r} line within {timeout} s: {path.read_text()[-2000:]}")


def launch(tmp: Path, name: str, remote: str | None, total: int, *args: str,
           supervised: bool = False) -> tuple[subprocess.Popen, Path, Path]:
    local, out = tmp / f"{name}-local", tmp / f"{name}.out"
    env = run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_KEEP_LAST="2")
    if remote:
        env["SPOTCKPT_REMOTE"] = remote
    cmd = [sys.executable, SCRIPT, "--total", str(total), *args]
    if supervised:  # `spotckpt run` owns the uploads; the script only commits locally
        cmd = [sys.executable, "-m", "spotckpt", "run", "--scan-interval", "0.5", "--", *cmd]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, local, out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant at once, as when the machine goes away."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(procs, timeout=30)


def last_done(out: Path) -> int | None:
    done = [int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("done ")]
    return done[-1] if done else None


def n_kills(s3_server: S3Server, n: int) -> int:
    """``n`` kills on moto, a fifth of them (at least 8) on RGW, to keep ``make test`` short."""
    return max(8, n // 5) if s3_server.kind == "rgw" else n


@pytest.mark.slow
def test_random_sigkills_resume_valid_and_bitwise_identical(tmp_path: Path, s3_server: S3Server,
                                                            s3_env: dict, capsys: pytest.CaptureFixture, figure) -> None:
    chaos(tmp_path, s3_server, capsys, figure, n_kills(s3_server, ITERATIONS), supervised=False)


@pytest.mark.slow
def test_random_sigkills_of_supervisor_and_script(tmp_path: Path, s3_server: S3Server,
                                                  s3_env: dict, capsys: pytest.CaptureFixture, figure) -> None:
    """The same under ``spotckpt run``: the supervisor uploads, the whole tree is killed."""
    chaos(tmp_path, s3_server, capsys, figure, n_kills(s3_server, max(15, ITERATIONS // 5)), supervised=True)


def chaos(tmp_path: Path, s3_server: S3Server, capsys: pytest.CaptureFixture, figure, iterations: int, *,
          supervised: bool) -> None:
    rng = random.Random()
    bucket = s3_server.new_bucket()
    prefix = "run/"
    remote = f"s3://{bucket}/{prefix}"
    kills = resumes = redone = orphans_max = most_committed = kills_with_orphan = orphans_before = 0
    phases: collections.Counter[str] = collections.Counter()
    manifests_checked = local_checked = 0
    expect_resume: int | None = None
    t0 = time.monotonic()
    startup = 1.0
    for i in range(iterations):
        proc, local, out = launch(tmp_path, f"r{i}", remote, BIG, "--sleep", "0.002", supervised=supervised)
        t_spawn = time.monotonic()
        early = rng.random() < 0.15  # some kills land during startup and restore
        if early:
            time.sleep(rng.uniform(0.0, startup))
        else:
            line = wait_for_line(out, "resumed ", proc)
            assert line is not None, out.read_text()
            startup = 0.8 * startup + 0.2 * (time.monotonic() - t_spawn)
            time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, f"run {i} ended by itself: {out.read_text()[-2000:]}"
        kill_tree(proc)
        kills += 1
        text = out.read_text()
        # the restart (run i) resumed exactly where the remote said it should
        for line in text.splitlines():
            if line.startswith("resumed "):
                got = None if line.split()[1] == "None" else int(line.split()[1])
                assert got == expect_resume, f"run {i} resumed at {got}, newest remote was {expect_resume}"
                resumes += 1
        ev = events(local)
        assert not any(e["event"] == "quarantine" for e in ev), ev
        sync_ev = [e["event"] for e in ev if e["event"] in SYNC_EVENTS]
        phases[PHASES[sync_ev[-1]] if sync_ev else "startup/restore"] += 1
        committed, orphans = remote_audit(s3_server, bucket, prefix)
        manifests_checked += len(committed)
        orphans_max = max(orphans_max, orphans)
        kills_with_orphan += orphans > orphans_before
        orphans_before = orphans
        local_checked += len(local_audit(local))
        done = last_done(out)
        if done is not None and committed:
            redone += max(0, done + 1 - committed[-1])
        if committed:
            assert expect_resume is None or committed[-1] >= expect_resume, "remote went backwards"
            expect_resume = committed[-1]
        most_committed = max(most_committed, len(committed))
        if kills % 50 == 0 and iterations > 50:
            with capsys.disabled():  # progress of a long run (make chaos), live
                print(f"\n[chaos] {kills}/{iterations} kills, {resumes} resumes, 0 invalid, "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
        if local.exists() and i % 10:
            import shutil

            for d in (local, LocalDir(local).meta):  # keep the tmp dir small; every 10th stays
                shutil.rmtree(d, ignore_errors=True)

    assert expect_resume is not None and expect_resume > 0, "no progress through the kills"
    total = expect_resume + 10
    proc, local, out = launch(tmp_path, "final", remote, total, "--out", str(tmp_path / "final.json"),
                              supervised=supervised)
    assert proc.wait(120) == 0, out.read_text()[-3000:]
    assert f"resumed {expect_resume}" in out.read_text()
    resumes += 1
    ref, _, ref_out = launch(tmp_path, "ref", None, total, "--out", str(tmp_path / "ref.json"))
    assert ref.wait(120) == 0, ref_out.read_text()[-3000:]
    a = json.loads((tmp_path / "final.json").read_text())
    b = json.loads((tmp_path / "ref.json").read_text())
    assert a == b and a["step"] == total
    # a completed run's retention leaves keep_last checkpoints and no leftovers of the kills
    committed, orphans = remote_audit(s3_server, bucket, prefix)
    assert committed[-1] == total and len(committed) == 2, committed
    assert orphans == 0, (f"{orphans} manifest-less step dirs left on the remote by the kills: "
                          f"{orphan_keys(s3_server, bucket, prefix)} (committed: {committed})")
    figure(f"[chaos] crash anywhere{' (spotckpt run)' if supervised else ''}{' on RGW' if s3_server.kind == 'rgw' else ''}: {kills} SIGKILLs, {resumes} resumes, 0 invalid resumes, "
           f"{redone} steps redone ({redone / kills:.1f}/kill), {manifests_checked} remote manifests "
           f"and {local_checked} local checkpoints verified after kills, final step {total} "
           f"bitwise equal to an uninterrupted run; uploader at kill: {dict(phases)}; {kills_with_orphan} kills left a payload without manifest; "
           f"at most {most_committed} remote checkpoints and {orphans_max} manifest-less remote dirs between kills (0 left at the end); {time.monotonic() - t0:.0f} s")


def test_retention_removes_payload_left_without_manifest(tmp_path: Path, remote_url: str) -> None:
    """Regression: a kill between payload and manifest upload (or between a delete's two
    halves) left ``step-N/`` payload that nothing removed; 50 kills leaked about 5 such dirs."""
    import spotckpt
    from spotckpt._commit._manifest import step_dirname
    from spotckpt._remote._store import RemoteStore

    store = RemoteStore(remote_url)
    for s in (3, 7, 30):
        store.put_bytes(f"{step_dirname(s)}/state.pkl", b"orphaned payload")
    store.put_bytes(f"{step_dirname(4)}/state.pkl", b"quarantined payload")
    store.put_bytes(f"{step_dirname(4)}/{MANIFEST}.quarantined", b"{}")
    state = {"n": 0}
    with spotckpt.Checkpointer(state, local_dir=tmp_path / "ck", remote=remote_url, every_steps=5) as ckpt:
        for _ in ckpt.steps(20):
            state["n"] += 1
            assert ckpt.flush(30)
    keys = store.find()
    assert store.committed() == [15, 20]
    assert not any(k.startswith((step_dirname(3), step_dirname(7))) for k in keys), keys
    assert f"{step_dirname(4)}/state.pkl" in keys  # quarantined: kept for inspection
    assert f"{step_dirname(30)}/state.pkl" in keys  # newer than the newest upload: maybe in flight


@pytest.mark.parametrize("supervised", [False, True], ids=["checkpointer", "spotckpt-run"])
def test_a_completed_run_leaves_no_payload_of_killed_generations(tmp_path: Path, remote_url: str,
                                                                  supervised: bool) -> None:
    """Regression (the chaos test under ``spotckpt run``, about one run in 20: "1 manifest-less
    step dirs left on the remote by the kills"): a process killed between payload and
    manifest upload had run ahead of the remote, so its payload lay past the step the next
    run completed, or beside that run's last checkpoint (its own generation's dir), where
    retention never looked: payload above the newest step may be this process's upload in
    flight. Another generation's never is: the fence keeps it from ever being committed."""
    from spotckpt._remote._fence import claim, generation_of, payload_dir
    from spotckpt._commit._manifest import step_dirname
    from spotckpt._remote._store import RemoteStore

    store = RemoteStore(remote_url)

    def run(name: str, total: int) -> str:
        proc, _, out = launch(tmp_path, name, remote_url, total, supervised=supervised)
        assert proc.wait(120) == 0, out.read_text()[-3000:]
        return out.read_text()

    assert "resumed None" in run("first", 3)  # generation 1 commits steps 2 and 3
    killed = claim(store).generation  # a run (generation 2) killed after uploading payload:
    for s in (3, 5, 8, 30, 50):  # beside the checkpoint restored, below, at and past the last step
        store.put_bytes(f"{payload_dir(s, killed)}/state.pkl", b"payload of a killed run")
    store.put_bytes(f"{step_dirname(40)}/state.pkl", b"payload of a killed generation 1")
    store.put_bytes(f"{step_dirname(50)}/{MANIFEST}.quarantined", b"{}")  # kept for inspection
    assert "resumed 3" in run("final", 8)  # generation 3
    keys = set(store.find())
    committed = store.committed()
    assert committed[-1] == 8 and len(committed) == 2, sorted(keys)
    assert unnamed(keys, store.cat) == [f"{step_dirname(50)}/{MANIFEST}.quarantined",
                                        f"{payload_dir(50, killed)}/state.pkl"], sorted(keys)
    for s in committed:  # and nothing a checkpoint names went
        m = store.read_manifest(s)
        assert {f"{payload_dir(s, generation_of(m))}/{e.path}" for e in m.files} <= keys, sorted(keys)


def test_retention_catches_up_with_a_backlog_in_a_few_requests(tmp_path: Path, s3_server: S3Server,
                                                               s3_env: dict) -> None:
    """Regression: retention deleted one checkpoint at a time (3 requests each). A process
    killed soon after each upload never finished a pass, so with 500 kills the remote held
    over 100 checkpoints and every pass took longer. Now a backlog goes in two bulk deletes."""
    import hashlib

    from faultproxy import FaultProxy
    from spotckpt._commit._manifest import FileEntry, build_manifest, step_dirname
    from spotckpt._remote._store import RemoteStore
    from spotckpt._sync._syncer import Syncer

    bucket = s3_server.new_bucket()
    client = s3_server.client()
    entry = FileEntry("state.pkl", 1, hashlib.sha256(b"p").hexdigest(), "sha256")  # a format-1 entry
    for s in range(1, 41):  # 30 committed checkpoints, then 10 orphaned payloads
        client.put_object(Bucket=bucket, Key=f"run/{step_dirname(s)}/state.pkl", Body=b"p")
        if s <= 30:
            m = build_manifest(s, [entry], framework="t", serializer="x")
            client.put_object(Bucket=bucket, Key=f"run/{step_dirname(s)}/{MANIFEST}", Body=m.to_json())
    local = LocalDir(tmp_path / "ck")
    tmp = local.begin(50)
    (tmp / "state.pkl").write_bytes(b"p")
    local.commit(tmp, build_manifest(50, [entry], framework="t", serializer="x"))
    with FaultProxy(s3_server.endpoint) as proxy:
        store = RemoteStore(f"s3://{bucket}/run/", {"client_kwargs": {"endpoint_url": proxy.endpoint}})
        syncer = Syncer(local, store, keep_last=2, mirror=False)
        syncer.start()
        syncer.submit(50)
        assert syncer.close(60)
        deletes = [(m, p) for m, p, _ in proxy.log if m == "DELETE" or (m == "POST" and "delete" in p)]
    committed, orphans = remote_audit(s3_server, bucket, "run/")
    assert committed == [30, 50] and orphans == 0, (committed, orphans)
    assert len(deletes) <= 4, deletes


def test_retention_cut_short_by_an_error_runs_again(tmp_path: Path) -> None:
    """Regression: an error in the retention after a run's last upload (a failed delete)
    made the Syncer retry the step, and the retry found the step committed and returned:
    that run left its orphans and a checkpoint too many."""
    import hashlib

    from spotckpt._errors import RemoteError
    from spotckpt._commit._manifest import FileEntry, build_manifest, step_dirname
    from spotckpt._remote._store import RemoteStore
    from spotckpt._sync._syncer import Syncer

    store = RemoteStore(f"file://{tmp_path / 'remote'}/")
    store.put_bytes(f"{step_dirname(2)}/state.pkl", b"orphaned payload")
    local = LocalDir(tmp_path / "ck")
    entry = FileEntry("state.pkl", 1, hashlib.sha256(b"p").hexdigest(), "sha256")
    tmp = local.begin(5)
    (tmp / "state.pkl").write_bytes(b"p")
    local.commit(tmp, build_manifest(5, [entry], framework="t", serializer="x"))
    rm_many, failed = store.rm_many, []

    def flaky(rels: list[str]) -> None:
        if rels and not failed:
            failed.append(rels)
            raise RemoteError("spotckpt: injected delete failure")
        rm_many(rels)
    store.rm_many = flaky  # type: ignore[method-assign]
    syncer = Syncer(local, store, keep_last=2, mirror=False, scan_interval=0.05)
    syncer.start()
    syncer.submit(5)
    assert not syncer.flush(30) and failed  # the retention failed ...
    assert syncer.close(30)  # ... and the retry of step 5 ran it again
    assert sorted(store.find()) == [f"{step_dirname(5)}/{MANIFEST}", f"{step_dirname(5)}/state.pkl"]
