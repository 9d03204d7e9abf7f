"""A Checkpointer under `spotckpt run` whose local dir is not the supervisor's (issue 26,
item 3). The supervisor uploads the dir it watches; a Checkpointer that commits elsewhere
used to believe the supervisor uploads for it: nothing reached the remote, exit 0, no word.
Now: the supervisor's own dir (however spelled) is served; another dir with the
supervisor's remote is refused at entry with one line; another dir with a remote of its own
is a lineage of its own, uploaded by the Checkpointer itself. Real processes, real files.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_env
from proc_helpers import PY, run, spotckpt

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

JOB = """
import sys
import spotckpt
kw = {"local_dir": sys.argv[1]}
if len(sys.argv) > 2:
    kw["remote"] = sys.argv[2]
state = {"n": 0}
with spotckpt.Checkpointer(state, every_steps=5, **kw) as ck:
    for step in ck.steps(total=20):
        state["n"] += 1
print("finished", state["n"], flush=True)
"""


def _run(tmp_path: Path, sup_dir: Path, remote: str, *args: str):
    return run(spotckpt("run", "--local-dir", str(sup_dir), "--remote", remote, "--", PY, "-c", JOB, *args),
               env=run_env(), timeout=120)


@pytest.mark.parametrize("where", ["elsewhere", "a subdir"])
def test_another_dir_to_the_supervisors_remote_is_refused_at_entry(tmp_path: Path, where: str) -> None:
    sup, remote = tmp_path / "sup", f"file://{tmp_path}/remote/"
    other = tmp_path / "other" if where == "elsewhere" else sup / "model"
    r = _run(tmp_path, sup, remote, str(other))
    assert r.returncode == 1 and "finished" not in r.stdout, r.stdout + r.stderr
    line = next((x for x in r.stderr.splitlines() if "ConfigError: spotckpt: under `spotckpt run`" in x), "")
    assert str(other) in line and str(sup) in line and "nothing would upload" in line, r.stderr
    assert not LocalDir(other).committed()  # refused before any step ran
    assert not RemoteStore(remote).committed()


def test_the_supervisors_dir_spelled_another_way_is_served(tmp_path: Path) -> None:
    sup, remote = tmp_path / "sup", f"file://{tmp_path}/remote/"
    sup.mkdir()
    (tmp_path / "link").symlink_to(sup)
    r = _run(tmp_path, sup, remote, str(tmp_path / "link") + "/")
    assert r.returncode == 0 and "finished 20" in r.stdout, r.stdout + r.stderr
    assert RemoteStore(remote).committed()[-1] == 20  # uploaded by the supervisor


def test_another_dir_with_a_remote_of_its_own_uploads_itself(tmp_path: Path) -> None:
    sup, remote, own = tmp_path / "sup", f"file://{tmp_path}/remote/", f"file://{tmp_path}/own/"
    r = _run(tmp_path, sup, remote, str(tmp_path / "other"), own)
    assert r.returncode == 0 and "finished 20" in r.stdout, r.stdout + r.stderr
    assert RemoteStore(own).committed()[-1] == 20
    assert not RemoteStore(remote).committed()
    assert "StaleGenerationError" not in r.stderr
