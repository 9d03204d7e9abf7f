"""Every framework callback on a local dir older than the remote defers to the newer remote
(issue 26, the family "every entry point with a stale dir"; the in-process entry points and
the CLI are generated in tests/watch/test_stale_dir.py).

Per framework, with its example script: dir ``old`` trains to ``T3`` with no remote (a
branch that never became durable); another instance then trains the job on an empty dir to
``T2 < T3`` with the remote, and a watched file gets a version there that is newer than the one
in ``old``. The callback started on ``old`` with the remote and the total ``T2`` must restore
the remote's ``T2``, not ``old``'s higher ``T3`` made before it; leave every remote checkpoint
and the newer file as they were; and keep what it set aside in the state dir. Before, it
resumed from ``T3`` and uploaded it as the job's newest, and the older file replaced the newer.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from chaoslib import events
from conftest import S3Server
from test_integration_common import run, script_env
from watched_helpers import script

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore
from spotckpt._watch._fileset import newest_set
from spotckpt._watch._watcher import Watcher

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

# framework -> (script, args for a total, T2, T3: totals in the script's own unit)
FRAMEWORKS = {
    "xgboost": ("train_xgboost.py", lambda n: ["--rounds", str(n), "--every-rounds", "5", "--early-stopping", "1000"],
                20, 30),
    "keras": ("train_keras.py", lambda n: ["--epochs", str(n), "--every-batches", "20"], 1, 2),
    "lightning": ("train_lightning.py", lambda n: ["--max-epochs", str(n), "--every-steps", "10"], 1, 2),
    "transformers": (script("hf_spot_train.py"), None, 1, 2),
}


def _argv(fw: str, total: int, tmp: Path, local: Path) -> list[str]:
    if fw == "transformers":
        out = tmp / f"hf-out-{local.name}-{total}"
        return ["--output-dir", str(out), "--local-dir", str(local), "--out", str(out) + ".pt",
                "--every", "4", "--epochs", str(total)]
    return FRAMEWORKS[fw][1](total)


def _run(fw: str, total: int, tmp: Path, s3: S3Server, local: Path, remote: str | None) -> str:
    env = script_env(s3, local, remote or "", KERAS_BACKEND="torch", HF_HUB_OFFLINE="1",
                     TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if remote is None:
        env.pop("SPOTCKPT_REMOTE")
    return run(FRAMEWORKS[fw][0], _argv(fw, total, tmp, local), env, timeout=300)


def _remote_steps(url: str) -> dict[int, list]:
    store = RemoteStore(url)
    return {s: sorted((e.path, e.size, e.digest) for e in store.read_manifest(s).files) for s in store.committed()}


@pytest.mark.parametrize("fw,s3_backend", [("xgboost", "moto"), ("xgboost", "rgw"), ("keras", "moto"),
                                           ("lightning", "moto"), ("transformers", "moto")],
                         indirect=["s3_backend"])
def test_callback_on_a_dir_older_than_the_remote_defers_to_it(fw: str, s3_backend: str, s3_server: S3Server,
                                                              s3_remote: str, tmp_path: Path) -> None:
    _, _, t2, t3 = FRAMEWORKS[fw]
    old, other = tmp_path / "old", tmp_path / "other"
    _run(fw, t3, tmp_path, s3_server, old, None)            # never durable: no remote
    (old / "notes.txt").write_bytes(b"dead branch")
    _run(fw, t2, tmp_path, s3_server, other, s3_remote)     # the instance that took the job on
    (other / "notes.txt").write_bytes(b"newer")
    Watcher(LocalDir(other), RemoteStore(s3_remote)).run_pass()
    before = _remote_steps(s3_remote)
    files = newest_set(RemoteStore(s3_remote)).entries
    newest = max(before)

    _run(fw, t2, tmp_path, s3_server, old, s3_remote)
    restored = [e for e in events(old) if e["event"] == "restore"][-1]
    assert restored["step"] == newest, restored  # (a local copy is taken only if it is the same checkpoint)
    assert newest < max(int(p.name.split("-")[2]) for p in (LocalDir(old).meta / "quarantine").glob("stale-step-*"))
    after = _remote_steps(s3_remote)
    assert {s: after.get(s) for s in before} == before and max(after) == newest, (sorted(before), sorted(after))
    assert newest_set(RemoteStore(s3_remote)).entries["notes.txt"] == files["notes.txt"]
    assert (old / "notes.txt").read_bytes() == b"newer"
    meta = LocalDir(old).meta
    assert [p for p in meta.rglob("notes.txt") if p.read_bytes() == b"dead branch"]
