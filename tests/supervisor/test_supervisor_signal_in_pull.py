"""A SIGTERM while `spotckpt run` pulls at start (issue 26, item 2). The pull can take
15-20 s (1,000 watched files); a notice then used to skip the command and run the final
flush through a Syncer that was never started: the newest local-only step was never
uploaded ("no checkpoint", exit 143) and the next machine started from scratch; and the
deadline was counted from the end of the pull, not from the signal. Real processes, real
signals, the S3 test server; the pull is held at its start by the events log's test-only
pause (tests/phase_helpers.py) for as long as the test wants, instead of a guess at its
duration.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from conftest import run_env
from phase_helpers import Pauses
from proc_helpers import PY, REPO, Proc, run, spotckpt

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

SCRIPT = str(REPO / "tests" / "scripts" / "counter_train.py")
GRACE, HELD = 12.0, 4.0


def _events(local: Path) -> list[dict]:
    p = LocalDir(local).meta / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.parametrize("second", [None, signal.SIGINT], ids=["SIGTERM", "SIGTERM+SIGINT"])
def test_sigterm_during_the_pull_uploads_the_newest_local_step_within_the_deadline(
        tmp_path: Path, s3_remote: str, second: signal.Signals | None) -> None:
    local = tmp_path / "local"
    # step 10 durable (a supervised run), then steps 20 and 30 committed locally only (the
    # same dir, no remote): what a restarted container on the same disk finds
    r = run(spotckpt("run", "--local-dir", str(local), "--remote", s3_remote, "--",
                     PY, SCRIPT, "--steps", "10", "--every-steps", "10"), env=run_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    r = run([PY, SCRIPT, "--steps", "30", "--every-steps", "10"], env=run_env(SPOTCKPT_LOCAL_DIR=str(local)))
    assert r.returncode == 0, r.stderr
    store = RemoteStore(s3_remote)
    assert store.committed() == [10] and LocalDir(local).committed()[-1] == 30

    pauses = Pauses(tmp_path / "pauses", "supervisor:pull_start")
    started = tmp_path / "started"
    p = Proc(spotckpt("run", "--local-dir", str(local), "--remote", s3_remote, "--grace", str(GRACE), "--",
                      PY, "-c", f"open({str(started)!r}, 'w')"), env=run_env(**pauses.env()))
    pauses.wait("supervisor:pull_start", proc=p.p)
    t_signal = time.time()
    p.p.send_signal(signal.SIGTERM)
    if second is not None:
        p.p.send_signal(second)
    time.sleep(HELD)                     # a pull that goes on for HELD s after the signal
    pauses.release("supervisor:pull_start")
    assert p.finish(120) == 143, p.stderr
    assert not started.exists()          # not started after a notice
    assert store.committed()[-1] == 30, p.stderr   # the newest local-only step is durable
    ev = _events(local)
    flush = [e for e in ev if e["event"] == "final_flush" and e["pid"] == p.pid]
    assert flush and flush[0]["durable"] and flush[0]["durable_step"] == 30, flush
    # the deadline runs from the signal: what was left at the flush's end is at most
    # GRACE - HELD (it was GRACE - the flush's own time, the clock started after the pull)
    assert flush[0]["seconds_left"] <= GRACE - HELD + 0.5, (flush, time.time() - t_signal)
    notice = next(e for e in ev if e["event"] == "notice" and e["pid"] == p.pid)
    # (two signals pending at once are delivered lowest number first: SIGINT, then SIGTERM)
    assert notice["source"] == ("SIGTERM" if second is None else "SIGINT")
