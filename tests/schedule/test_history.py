"""The job's incarnation history (``history.json`` beside the checkpoints): bounded in size
whatever the number of restarts, written only by the newest generation, robust to hostile
content, and right about how the previous incarnation ended: a real training process
SIGKILLed (``hard-kill``), SIGTERMed and saved (``notice-saved``), run to the end
(``completed``), against the moto S3 server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, S3Server
from hypothesis import given, settings, strategies as st

from spotckpt._remote import HISTORY_KEY, RemoteStore, _history, claim
from spotckpt._remote._history import KEEP, Recorder
from spotckpt._watch._fileset import foreign

SCRIPT = REPO / "tests" / "scripts" / "auto_train.py"


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["completed", "error", "notice-saved", "notice-late", None]), min_size=1,
                max_size=3 * KEEP))
def test_history_stays_bounded_and_its_totals_count_every_incarnation(endings: list[str | None]) -> None:
    """None: the incarnation never said how it ended (killed): the next one records hard-kill."""
    with tempfile.TemporaryDirectory() as d:
        store = RemoteStore(f"file://{d}/remote/")
        clock, want, run_s = _Clock(), {}, 0.0
        for i, how in enumerate(endings):
            rec = Recorder.begin(store, claim(store), clock=clock)
            assert rec.summary["incarnations"] == i and rec.summary["ended"] == {k: v for k, v in want.items() if v}
            clock.t += 10.0 + i
            rec.beat()
            clock.t += 1.0
            if how is None:
                how = "hard-kill"   # (what the next start will say; counted up to the last beat)
                run_s += 10.0 + i
            else:
                assert rec.end(how)
                run_s += 11.0 + i
            want[how] = want.get(how, 0) + 1
        doc = _history.read(store)
        raw = store.cat(HISTORY_KEY)
        assert len(doc["incarnations"]) <= KEEP and len(raw) < 12_000, len(raw)
        last = doc["incarnations"][-1]
        ended = dict(doc["totals"]["ended"])
        if last["ended"] == "running":   # the last one was "killed": nobody has said so yet
            want["hard-kill"] -= 1
            run_s -= 10.0 + len(endings) - 1
        assert ended == {k: v for k, v in want.items() if v}
        assert doc["totals"]["incarnations"] == sum(want.values())
        assert doc["totals"]["run_s"] == pytest.approx(run_s)


def test_only_the_newest_generation_writes_it(tmp_path: Path) -> None:
    store = RemoteStore(f"file://{tmp_path}/remote/")
    old = Recorder.begin(store, claim(store))
    new = Recorder.begin(store, claim(store))   # a replacement started while the old one runs
    assert new.summary["ended"] == {"hard-kill": 1}
    assert old.end("completed") is False       # stale: the newer generation owns the history
    old.beat()                                  # after its refused end, the stale instance writes nothing
    doc = _history.read(store)
    assert [r["ended"] for r in doc["incarnations"]] == ["hard-kill", "running"]
    assert new.end("completed") is True
    doc = _history.read(store)
    assert doc["incarnations"][-1]["ended"] == "completed" and doc["totals"]["ended"]["completed"] == 1


def test_a_restart_seeds_from_the_newest_decision_that_measured_c(tmp_path: Path) -> None:
    """An incarnation killed before it measured anything passes nothing on; the one before it
    did (a chain of early kills used to send every later restart back to the first interval)."""
    store = RemoteStore(f"file://{tmp_path}/remote/")
    first = Recorder.begin(store, claim(store))
    first.decision = lambda: {"interval_s": 300.0, "c_s": 4.0, "d_s": 20.0, "d_meter_s": 12.0}
    first.beat()
    second = Recorder.begin(store, claim(store))          # the first was killed: hard-kill
    second.decision = lambda: {"interval_s": 60.0, "c_s": None, "d_s": None}
    second.beat()
    third = Recorder.begin(store, claim(store))
    assert third.summary["previous"]["generation"] == 2
    assert third.summary["measured"] == {"generation": 1, "decision": {"interval_s": 300.0, "c_s": 4.0,
                                                                      "d_s": 20.0, "d_meter_s": 12.0}}
    from spotckpt._cadence import Schedule
    from spotckpt._checkpointer._autosave import _Auto
    a = _Auto(Schedule(), clock=lambda: 0.0, grace=120.0, grace_source="test", state_dir=tmp_path,
              shared_state=tmp_path)
    a.recorder = third
    a.seed()
    assert (a.meter.c, a.meter.d) == (4.0, 12.0)  # the meter's own D, not one with a supervisor's upload in it
    assert a.decide().how != "first"


@pytest.mark.parametrize("content", [
    b"\x00\xff not json", b"[]", b'{"format": "other/9"}', b"{" * 5000 + b"}" * 5000,
    json.dumps({"format": "spotckpt-history/1", "totals": {"incarnations": -5, "run_s": "NaN",
                                                           "ended": {"hard-kill": -2, "bogus": 7}},
                "incarnations": [{"generation": -1}, {"generation": "7"}, "x", None,
                                 {"generation": 3, "ended": "exploded", "run_s": -1, "started": 1e400}]}).encode(),
    b" " * (2 << 20),
])
def test_a_hostile_history_is_replaced_not_believed(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / HISTORY_KEY).write_bytes(content)
    store = RemoteStore(f"file://{tmp_path}/remote/")
    rec = Recorder.begin(store, claim(store))
    s = rec.summary
    assert s["incarnations"] >= 0 and s["run_s"] >= 0 and all(v >= 0 for v in s["ended"].values())
    assert set(s["ended"]) <= set(_history.ENDINGS)
    doc = _history.read(store)
    assert doc["incarnations"][-1]["generation"] == rec.rec["generation"]
    assert all(r["ended"] in _history.ENDINGS for r in doc["incarnations"])
    assert "history.json" not in " ".join(foreign(store.list_keys()))  # ours, not a stranger's object


# -- real processes against the S3 server ---------------------------------------------------
def _env(s3: S3Server, local: Path, remote: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTCKPT_")}
    env.pop("AWS_ENDPOINT_URL", None)
    env.update(s3.env())
    env.update(PYTHONUNBUFFERED="1", SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=remote,
               SPOTCKPT_GRACE_SECONDS="30", SPOTCKPT_METADATA="off", AUTO_EVERY="auto", AUTO_MIN="0.2",
               AUTO_MAX="0.5", AUTO_STEP_S="0.02", AUTO_STATE_MB="1", **extra)
    return env


def _wait_for(path: Path, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and what in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what!r} not in {path} after {timeout} s")


def _beaten(store: RemoteStore) -> bool:
    """The newest record has a beat carrying a measured C (the first save of a process is not
    a sample: this takes two durable saves)."""
    recs = _history.read(store)["incarnations"]
    return bool(recs) and recs[-1]["run_s"] > 0 and (recs[-1].get("decision") or {}).get("c_s") is not None


def _begun(events: Path) -> list[dict]:
    return [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "history_begin"]


@pytest.mark.slow
def test_how_the_previous_incarnation_ended_sigkill_then_sigterm(tmp_path: Path, s3_server: S3Server,
                                                                 s3_remote: str) -> None:
    from spotckpt._commit import LocalDir

    def start(n: int, steps: int) -> tuple[subprocess.Popen, Path, Path]:
        local, progress = tmp_path / f"ck{n}", tmp_path / f"progress{n}"   # a new machine each time
        env = _env(s3_server, local, s3_remote, AUTO_STEPS=str(steps), AUTO_PROGRESS=str(progress))
        proc = subprocess.Popen([sys.executable, str(SCRIPT)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        return proc, local, progress

    store = RemoteStore(s3_remote)
    # 1: killed without warning once it measured what a save costs (its beat is in the history)
    p, local, progress = start(1, 100_000)
    _wait_for(progress, "step ")
    end = time.monotonic() + 120
    while not _beaten(store):
        assert time.monotonic() < end and p.poll() is None, "no beat of the history"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert _history.read(store)["incarnations"][-1]["ended"] == "running"  # it could say nothing
    # 2: a notice: SIGTERM, the Checkpointer saves within the grace, exits 143
    p, local, progress = start(2, 100_000)
    _wait_for(progress, "step ")
    (begun,) = _begun(LocalDir(local).meta / "events.jsonl")
    assert begun["ended"] == {"hard-kill": 1} and begun["incarnations"] == 1 and begun["run_s"] > 0
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143, out
    doc = _history.read(store)
    assert [r["ended"] for r in doc["incarnations"]] == ["hard-kill", "notice-saved"], doc
    # 3: runs to the end
    p, local, progress = start(3, 30)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    events = LocalDir(local).meta / "events.jsonl"
    (begun,) = _begun(events)
    assert begun["ended"] == {"hard-kill": 1, "notice-saved": 1}
    assert begun["previous"]["ended"] == "notice-saved"
    # a restart starts from the cost its predecessor measured, not from the first interval
    first = next(e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "schedule")
    assert first["how"] != "first" and first["c_s"] is not None, first
    assert "an earlier incarnation (generation 2)" in first["sources"]["c"], first["sources"]
    doc = _history.read(store)
    assert [r["ended"] for r in doc["incarnations"]] == ["hard-kill", "notice-saved", "completed"]
    assert doc["totals"]["ended"] == {"hard-kill": 1, "notice-saved": 1, "completed": 1}
    assert all(r["decision"]["interval_s"] > 0 for r in doc["incarnations"])  # each recorded its schedule
    assert [r["generation"] for r in doc["incarnations"]] == [1, 2, 3]


@pytest.mark.slow
def test_every_rank_decides_from_rank_0s_history(tmp_path: Path) -> None:
    """Under torch.distributed only rank 0 keeps the history; the others get its summary."""
    from conftest import free_port, run_env

    def job() -> list[dict]:
        port, procs = free_port(), []
        for rank in (0, 1):
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "scripts" / "dist_auto_train.py")],
                env=run_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", SPOTCKPT_METADATA="off",
                            SPOTCKPT_LOCAL_DIR=str(tmp_path / "ck"), SPOTCKPT_REMOTE=f"file://{tmp_path}/remote/"),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=300)[0] for p in procs]
        got = []
        for p, out in zip(procs, outs):
            lines = [json.loads(x) for x in out.splitlines() if x.startswith('{"rank"')]
            # (torch 2.13 + gloo may abort a finished rank at exit: docs/guides/distributed.md)
            assert lines and p.returncode in (0, -6), out[-3000:]
            got += lines
        return sorted(got, key=lambda x: x["rank"])
    first = job()
    assert [x["incarnations"] for x in first] == [0, 0]
    assert first[0]["note"].startswith("history.json on the remote") and first[1]["note"] == "rank 0's history"
    second = job()   # the same job started again: the history says one incarnation completed
    assert [x["incarnations"] for x in second] == [1, 1], second
    doc = _history.read(RemoteStore(f"file://{tmp_path}/remote/"))
    assert [r["ended"] for r in doc["incarnations"]] == ["completed", "completed"]
