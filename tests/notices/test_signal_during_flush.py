"""A second signal while the interruption save is being flushed (issue 26, item 5). In
process (no supervisor), a SIGINT that arrived while the save of a SIGTERM was uploading
raised KeyboardInterrupt in the middle of the flush: the notice's step never became durable
(the remote kept the previous step only). Once a notice is being flushed, further SIGTERM
and SIGINT must not abort it. The upload is held at its start by the events log's test-only
pause (tests/phase_helpers.py), so the second signal lands inside the flush every time.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import run_env
from phase_helpers import Pauses
from proc_helpers import PY, REPO, Proc

from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore

SCRIPT = str(REPO / "tests" / "scripts" / "counter_train.py")


def _events(local: Path) -> list[dict]:
    p = LocalDir(local).meta / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.parametrize("then", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT, signal.SIGTERM]],
                         ids=["SIGINT", "SIGTERM", "SIGINT-SIGINT-SIGTERM"])
def test_signals_during_the_interruption_flush_do_not_abort_it(tmp_path: Path, s3_remote: str,
                                                               then: list[signal.Signals]) -> None:
    local = tmp_path / "local"
    pauses = Pauses(tmp_path / "pauses", "checkpointer:upload_start")
    # no periodic save: the first upload is the interruption save's
    p = Proc([PY, SCRIPT, "--steps", "100000", "--every-steps", "100000", "--sleep", "0.01"],
             env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=s3_remote, SPOTCKPT_GRACE_SECONDS="60",
                         **pauses.env()))
    p.wait_for(r"^step 20$", 60)
    p.p.send_signal(signal.SIGTERM)
    pauses.wait("checkpointer:upload_start", proc=p.p)   # the save is committed, its upload held
    for sig in then:
        p.p.send_signal(sig)
    pauses.release("checkpointer:upload_start")
    assert p.finish(90) == 143, p.stderr
    assert "KeyboardInterrupt" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    notice = next(e for e in _events(local) if e["event"] == "notice")
    flush = next(e for e in _events(local) if e["event"] == "flush")
    assert flush["durable"] and flush["step"] == notice["step"], flush
    assert RemoteStore(s3_remote).committed() == [notice["step"]]
    if signal.SIGINT in then:
        assert "SIGINT" in p.stderr and "the interruption save goes on" in p.stderr, p.stderr
