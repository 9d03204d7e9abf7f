"""Nothing of spotckpt's in the watched dir, and user entries named like ours left alone
(issue 11, finding 10).

Scripts read "the checkpoint dir is not empty" as "resume" (AWS's TF2 ``mnist.py`` then takes
``max()`` of the epoch numbers it finds): a fresh start must see an empty dir, whether the
script opens a Checkpointer, runs under ``spotckpt run`` or under ``spotckpt spot``. And a
user's dir ``step-000000000002/`` or file ``step-000000000001`` is the user's: never deleted,
and mirrored like any other user file. Real processes, real signals, the S3 test server.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import remote_files, run_env
from proc_helpers import PY, Proc, run, spotckpt
from spotckpt import Checkpointer
from spotckpt._errors import LocalDirError
from spotckpt._commit._local import STATE_ENV, LocalDir, state_dir
from spotckpt._remote._store import RemoteStore

# AWS's TF2 mnist.py logic in plain Python: a non-empty dir means "resume from the newest
# epoch file"; with no epoch file in it, max() of an empty list fails.
MNIST_LIKE = r"""
import json, os, re, sys, time
d, epochs = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
if os.listdir(d):
    files = [f for f in os.listdir(d) if f.endswith(".json")]
    start = max(int(re.search(r"(\d+)", f).group(1)) for f in files)
    with open(os.path.join(d, f"model-epoch-{start}.json")) as f:
        w = json.load(f)["w"]
    print("resumed from epoch", start, flush=True)
else:
    start, w = 0, 0
    print("fresh start", flush=True)
for epoch in range(start + 1, epochs + 1):
    time.sleep(0.3)
    w += epoch
    tmp = os.path.join(d, f".model-epoch-{epoch}.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"w": w}, f)
    os.replace(tmp, os.path.join(d, f"model-epoch-{epoch}.json"))
    print("saved epoch", epoch, flush=True)
print("done w", w, flush=True)
"""

EMPTY_AT_START = """
import os, sys
print("listing", sorted(os.listdir(sys.argv[1])), flush=True)
assert os.listdir(sys.argv[1]) == []
"""

CHECKPOINTER_JOB = """
import os, sys, spotckpt
d, remote, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = sorted(os.listdir(d))
with spotckpt.Checkpointer({"w": [0]}, local_dir=d, remote=remote or None, every_steps=3, keep_last=1) as ck:
    print("after open", sorted(os.listdir(d)), flush=True)
    assert sorted(os.listdir(d)) == before, (before, os.listdir(d))
    for step in ck.steps(total=steps) if steps else ():
        pass
print("ok", flush=True)
"""

USER_DIR, USER_FILE = "step-000000000002", "step-000000000001"


def _run_argv(local: Path, remote: str, *cmd: str) -> list[str]:
    return spotckpt("run", "--local-dir", str(local), "--remote", remote, "--grace", "20",
                    "--stable-seconds", "0.3", "--", *cmd)


def remote_user_file(url: str, rel: str) -> bytes | None:
    """The committed remote copy of the user file ``rel`` (the newest file set), or None."""
    e = remote_files(url).get(rel)
    return None if e is None else RemoteStore(url).cat(e.key)


def _user_entries(local: Path) -> None:
    (local / USER_DIR).mkdir(parents=True)
    (local / USER_DIR / "notes.txt").write_text("mine")
    (local / USER_FILE).write_text("also mine")


def _assert_user_entries(local: Path) -> None:
    assert (local / USER_DIR / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(local / USER_DIR)) == ["notes.txt"]
    assert (local / USER_FILE).read_text() == "also mine"


# -- a fresh start sees an empty dir -----------------------------------------------------------
def test_checkpointer_open_leaves_an_empty_dir_empty(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ck"
    local.mkdir()
    (tmp_path / "job.py").write_text(CHECKPOINTER_JOB)
    r = run([PY, str(tmp_path / "job.py"), str(local), s3_remote, "0"], env=run_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "after open []" in r.stdout
    assert os.listdir(local) == []
    assert (LocalDir(local).meta / "trainer.lock").exists()  # the state went elsewhere


def test_run_child_starts_in_an_empty_dir(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ck"
    local.mkdir()
    (tmp_path / "job.py").write_text(EMPTY_AT_START)
    r = run(_run_argv(local, s3_remote, PY, str(tmp_path / "job.py"), str(local)), env=run_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "listing []" in r.stdout


@pytest.mark.slow
def test_mnist_like_script_under_run_is_interrupted_and_resumes_on_an_empty_dir(
        tmp_path: Path, s3_remote: str) -> None:
    script = tmp_path / "mnist_like.py"
    script.write_text(MNIST_LIKE)
    a = tmp_path / "instance-a"
    a.mkdir()
    p = Proc(_run_argv(a, s3_remote, PY, str(script), str(a), "8"), env=run_env())
    p.wait_for(r"^saved epoch 3$", 60)
    assert "fresh start" in p.stdout
    os.kill(p.pid, signal.SIGTERM)
    assert p.finish(30) == 143, p.stderr

    b = tmp_path / "instance-b"                      # a new instance: an empty local dir
    b.mkdir()
    r = run(_run_argv(b, s3_remote, PY, str(script), str(b), "8"), env=run_env())
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = int(r.stdout.split("resumed from epoch ", 1)[1].split()[0])
    assert resumed >= 3
    assert "done w 36" in r.stdout                   # 1 + ... + 8: every epoch counted once


@pytest.mark.slow
def test_mnist_like_script_under_spot_completes(tmp_path: Path, s3_remote: str) -> None:
    script = tmp_path / "mnist_like.py"
    script.write_text(MNIST_LIKE)
    local = tmp_path / "ckpt"
    r = run(spotckpt("spot", "--workdir", str(tmp_path / "wd"), "--local-dir", str(local),
                     "--remote", s3_remote, "--grace", "5", "--capacity-wait", "0.2",
                     "--max-run", "60", "--interrupt-at", "1.0", "--stable-seconds", "0.3",
                     "--", PY, str(script), str(local), "8"), env=run_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fresh start" in r.stdout and "done w 36" in r.stdout
    assert "max() arg" not in r.stderr


# -- user entries named like ours ---------------------------------------------------------------
def test_user_entries_named_like_checkpoints_survive_a_checkpointer(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ck"
    _user_entries(local)
    (tmp_path / "job.py").write_text(CHECKPOINTER_JOB)
    r = run([PY, str(tmp_path / "job.py"), str(local), s3_remote, "5"], env=run_env())
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_user_entries(local)
    assert LocalDir(local).committed() == [5]        # ours: saved at 3 and 5, keep_last=1
    assert RemoteStore(s3_remote).committed() == [5]
    assert remote_user_file(s3_remote, USER_FILE) == b"also mine"

    # A restart on the same dir (startup cleanup, restore) leaves them alone too.
    r = run([PY, str(tmp_path / "job.py"), str(local), s3_remote, "5"], env=run_env())
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_user_entries(local)


def test_user_entries_named_like_checkpoints_survive_run(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "ck"
    _user_entries(local)
    r = run(_run_argv(local, s3_remote, PY, "-c", "print('child ran')"), env=run_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "child ran" in r.stdout
    _assert_user_entries(local)
    assert remote_user_file(s3_remote, USER_FILE) == b"also mine"

    b = tmp_path / "b"                               # and a new instance gets the file back
    b.mkdir()
    r = run(_run_argv(b, s3_remote, PY, "-c", "print('child ran')"), env=run_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert (b / USER_FILE).read_text() == "also mine"


def test_a_step_that_collides_with_a_user_entry_stops_clearly(tmp_path: Path) -> None:
    local = tmp_path / "ck"
    local.mkdir()
    user = local / "step-000000000003"
    user.mkdir()
    (user / "MANIFEST.json").write_text('{"mine": true}')   # not a spotckpt manifest
    assert LocalDir(local).committed() == []
    with pytest.raises(LocalDirError, match="step-000000000003.*not a spotckpt checkpoint"):
        with Checkpointer({"w": [0]}, local_dir=local, every_steps=3) as ck:
            for _ in ck.steps(total=5):
                pass
    assert (user / "MANIFEST.json").read_text() == '{"mine": true}'
    assert sorted(os.listdir(user)) == ["MANIFEST.json"]


# -- where the state goes --------------------------------------------------------------------
def test_state_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "x" / "a", tmp_path / "y" / "a"
    assert state_dir(a) == tmp_path / "x" / ".a.spotckpt"      # beside it, parent writable
    link = tmp_path / "link"
    a.mkdir(parents=True)
    link.symlink_to(a)
    assert state_dir(link) == state_dir(a)                      # one dir, one state dir

    monkeypatch.setenv(STATE_ENV, str(tmp_path / "states"))
    assert state_dir(a).parent == tmp_path / "states"
    assert state_dir(a) != state_dir(b) and state_dir(link) == state_dir(a)

    monkeypatch.delenv(STATE_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "file").write_text("")
    in_file = tmp_path / "file" / "ck"                          # no writable parent
    assert state_dir(in_file).parent == tmp_path / "xdg" / "spotckpt"
    for d in (a, b, link, in_file):
        assert not state_dir(d).is_relative_to(os.path.realpath(d))


def test_owns_and_is_internal_tell_ours_from_the_users(tmp_path: Path) -> None:
    """What the mirror's scanner asks: real dirs written by a real commit and by the user."""
    local = tmp_path / "ck"
    with Checkpointer({"w": [0]}, local_dir=local, every_steps=3) as ck:
        for _ in ck.steps(total=3):
            pass
    d = LocalDir(local)
    _user_entries(local)
    legacy = local / "step-000000000004"             # committed by a version without the marker
    legacy.mkdir()
    (legacy / "MANIFEST.json").write_bytes(d.read_manifest(3).to_json().replace(b'"step": 3', b'"step": 4'))
    tmp = d.begin(9)

    assert d.owns("step-000000000003") and d.owns("step-000000000004") and d.owns(tmp.name)
    assert not d.owns(USER_DIR) and not d.owns(USER_FILE) and not d.owns("other")
    assert d.committed() == [3, 4]
    payload = d.read_manifest(3).files[0].path
    assert d.is_internal(f"step-000000000003/{payload}") and d.is_internal(f"{tmp.name}/x")
    assert not d.is_internal(USER_FILE) and not d.is_internal(f"{USER_DIR}/notes.txt")
    d.clean_temp()                                   # crash leftovers of ours only
    assert not tmp.exists() and (local / USER_DIR / "notes.txt").exists()
    d.delete(2)                                      # a user's dir: never deleted as ours
    assert (local / USER_DIR / "notes.txt").exists()
