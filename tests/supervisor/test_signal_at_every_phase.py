"""A signal at every phase (issue 26, "Beyond the fourteen: test families"): of the
supervisor's life (pull, claim, child start, running, upload, child exit, final flush) and
of the Checkpointer's (open/restore, running, save, upload, close); SIGTERM or SIGINT, alone
or followed by a second SIGTERM or SIGINT; in process and under ``spotckpt run``; with 1 and
2 ranks (torchrun, gloo). Real processes and signals, the S3 test server (moto, and RGW for
a third of the cases).

Each phase is reached deterministically: the process pauses in the thread that writes the
phase's event (the events log's test-only hook, tests/phase_helpers.py) and the signals are
sent while it is there; "running" waits for the script's ``step 20`` line. Never a sleep.

What must hold, whatever the case (the oracle, :func:`_check`):

- nothing regresses: the remote's newest checkpoint verifies (every file, size and XXH3) and
  is at least the one durable when the first signal came;
- exit status 143 (a notice was handled: an interruption save, the supervisor's final
  flush, or a notice during close) means the newest committed state is durable: the
  remote's newest checkpoint is the newest committed anywhere (locally by every rank, or
  pulled). ``spotckpt run`` exits 143 after any of these signals;
- otherwise (in process, a Ctrl-C's SIGINT, which is not a notice there: KeyboardInterrupt,
  died of SIGINT; a second Ctrl-C may cut the flush of what was committed) the remote holds
  a committed state no older than the one durable before (the previous one);
- no error of ours on stderr (a KeyboardInterrupt is Python's own answer to a SIGINT that
  reaches a process outside a Checkpointer);
- a restart on an empty dir resumes from the remote's newest checkpoint (one rank).

``make test`` runs a representative subset (every phase in each mode once, every pair of
first and second signal, a third with 2 ranks); ``SPOTCKPT_CHAOS_ITERATIONS=N`` (``make
chaos``: 500) runs min(N, all) of the combinations.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import re
import signal
from pathlib import Path

import psutil
import pytest
from chaoslib import remote_audit
from conftest import free_port, run_env
from phase_helpers import Pauses
from proc_helpers import PY, REPO, Proc, run, spotckpt, wait_until

from spotckpt._commit._local import LocalDir

COUNTER = str(REPO / "tests" / "scripts" / "counter_train.py")
DIST = str(REPO / "tests" / "scripts" / "dist_counter_train.py")
GRACE = 30


@dataclasses.dataclass(frozen=True)
class Phase:
    modes: tuple[str, ...]
    pause: dict[int, str | None]  # ranks -> the pause entry (None: wait for the "step 20" line)
    completes: bool = False       # the command runs to its end (phases after it)
    base: bool = False            # needs a durable checkpoint before the run (restored, pulled)
    same_disk: bool = False       # one process: the earlier instance's dir, with a newer step
                                  # committed there only (a container restarted on its disk)


SUP, INP = "supervised", "in-process"
PHASES = {
    "pull": Phase((SUP,), {1: "supervisor:pull_start", 2: "supervisor:pull_start"}, base=True, same_disk=True),
    "claim": Phase((SUP,), {1: "supervisor:claimed", 2: "supervisor:claimed"}),
    "child start": Phase((SUP,), {1: "supervisor:child_start", 2: "supervisor:child_start"}),
    "running": Phase((SUP, INP), {1: None, 2: None}),
    "upload": Phase((SUP, INP), {1: "upload_start", 2: "checkpointer:upload_start"}),
    "child exit": Phase((SUP,), {1: "supervisor:child_exit", 2: "supervisor:child_exit"}, completes=True),
    "final flush": Phase((SUP,), {1: "supervisor:final_flush_start", 2: "supervisor:final_flush_start"},
                         completes=True),
    "open/restore": Phase((SUP, INP), {1: "checkpointer:restore", 2: "checkpointer:restore"}, base=True),
    "save": Phase((SUP, INP), {1: "checkpointer:saved", 2: "checkpointer:saved"}),
    "close": Phase((SUP, INP), {1: "checkpointer:closing", 2: "checkpointer:closing"}, completes=True),
}
SIGNALS = (signal.SIGTERM, signal.SIGINT)
SECONDS = (None, signal.SIGTERM, signal.SIGINT)


@dataclasses.dataclass(frozen=True)
class Case:
    phase: str
    first: signal.Signals
    second: signal.Signals | None
    mode: str
    ranks: int

    def __str__(self) -> str:
        sig = self.first.name + (f"+{self.second.name}" if self.second else "")
        return f"{self.phase.replace(' ', '-').replace('/', '-')}-{sig}-{self.mode}-{self.ranks}rank"


ALL = [Case(ph, first, second, mode, ranks) for ph, spec in PHASES.items() for mode in spec.modes
       for ranks in (1, 2) for first, second in itertools.product(SIGNALS, SECONDS)]


def _subset() -> list[Case]:
    """Every phase under the supervisor once, the six (first, second) pairs in turn, every
    third case with 2 ranks; every phase in process twice (cheap), so that the six pairs
    are there too, two of them with 2 ranks."""
    pairs = list(itertools.product(SIGNALS, SECONDS))
    out = [Case(ph, *pairs[i % 6], SUP, 2 if i % 3 == 2 else 1)
           for i, ph in enumerate(ph for ph, spec in PHASES.items() if SUP in spec.modes)]
    for i, ph in enumerate(ph for ph, spec in PHASES.items() if INP in spec.modes):
        out += [Case(ph, *pairs[i % 6], INP, 1), Case(ph, *pairs[(i + 3) % 6], INP, 2 if i % 2 else 1)]
    return out


def _cases() -> list[tuple[Case, str]]:
    n = int(os.environ.get("SPOTCKPT_CHAOS_ITERATIONS") or 0)
    cases = _subset() if not n else random.Random(26).sample(ALL, min(n, len(ALL)))
    rgw = cases[::3]  # a third also on RGW, the real server
    return [(c, "moto") for c in cases] + [(c, "rgw") for c in rgw]


def _marks(case: Case, backend: str) -> list:
    # measured on the loaded 2-core machine: every case takes 4 s or more but one-rank
    # in-process cases on moto
    return [] if (case.ranks == 1 and case.mode == INP and backend == "moto") else [pytest.mark.slow]


# -- running one case ---------------------------------------------------------------------------
def _followup(case: Case) -> str | None:
    """Where the second signal goes: once the first was taken (a signal handler cannot be
    watched, and two signals pending at once are taken lowest number first, SIGINT before
    SIGTERM). The supervisor's notice; in process the interruption save's notice, or for a
    Ctrl-C (KeyboardInterrupt, not a notice there) the Checkpointer's close; None: at once
    (the phase is that close itself)."""
    if case.mode == SUP:
        return "supervisor:notice"
    if case.first == signal.SIGTERM:
        return "checkpointer:notice"
    return None if case.phase == "close" else "checkpointer:closing"


def _command(case: Case, steps: int) -> list[str]:
    if case.ranks == 1:
        return [PY, COUNTER, "--steps", str(steps), "--every-steps", "10", "--sleep", "0.01"]
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), DIST, "--steps", str(steps), "--every-steps", "10", "--sleep", "0.01"]


def _argv(case: Case, local: Path, remote: str, steps: int) -> tuple[list[str], dict[str, str]]:
    env = {"SPOTCKPT_GRACE_SECONDS": str(GRACE), "SPOTCKPT_DIST_TIMEOUT": "60", "GLOO_SOCKET_IFNAME": "lo"}
    if case.mode == SUP:
        return spotckpt("run", "--local-dir", str(local), "--remote", remote, "--grace", str(GRACE), "--",
                        *_command(case, steps)), env
    return _command(case, steps), {**env, "SPOTCKPT_LOCAL_DIR": str(local), "SPOTCKPT_REMOTE": remote}


def _rank0(p: Proc) -> int:
    """The pid of rank 0 under torchrun (in process: the signals go to one rank, as a
    notice reaching one host does)."""
    def find() -> int | None:
        for c in psutil.Process(p.pid).children(recursive=True):
            try:
                if c.environ().get("RANK") == "0" and DIST in " ".join(c.cmdline()):
                    return c.pid
            except psutil.Error:
                pass
        return None
    return int(wait_until(find, 120, "rank 0"))


def _committed(local: Path, ranks: int) -> list[int]:
    """Steps committed locally by every rank (one process: in the dir itself)."""
    if ranks == 1:
        return LocalDir(local).committed()
    parts = [set(LocalDir(local).part(f"rank-{r:05d}").committed()) for r in range(ranks)]
    return sorted(set.intersection(*parts))


def _durable(server, bucket: str) -> int | None:
    """The remote's newest committed step, listed straight through boto3."""
    steps = [int(k["Key"].split("/")[1][5:]) for page in server.client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="run/step-") for k in page.get("Contents", []) if k["Key"].endswith("/MANIFEST.json")]
    return max(steps, default=None)


def _errors_of_ours(stderr: str) -> list[str]:
    """Tracebacks through spotckpt's code that end in anything but KeyboardInterrupt (Python's
    own answer to a SIGINT that reaches a process outside a Checkpointer's handlers: a child
    still importing, a rank that closed already, a Ctrl-C in process). A KeyboardInterrupt
    inside a Checkpointer's window would show in what is durable, which _check judges."""
    streams: dict[str, list[str]] = {}  # torchrun prefixes each rank's lines: one stream each
    for line in stderr.splitlines():
        m = re.match(r"^(\[rank\d+\]):\s?", line)
        streams.setdefault(m.group(1) if m else "", []).append(line[m.end():] if m else line)
    out = []
    for lines in streams.values():
        block: list[str] | None = None
        for text in lines:
            if text.startswith("Traceback (most recent call last)"):
                block = []
            elif block is not None and (text.startswith(" ") or not text.strip()
                                        or text.startswith(("The above exception", "During handling"))):
                block.append(text)
            elif block is not None:
                if any(re.search(r'File ".*/spotckpt/', b) for b in block) and text.strip() != "KeyboardInterrupt":
                    out.append(text)
                block = None
    return out


def _check(case: Case, rc: int, local: Path, remote_steps: list[int], before: int | None, out: str) -> None:
    """``before``: the remote's newest checkpoint just before the first signal."""
    newest = max([*_committed(local, case.ranks), *([before] if before is not None else [])], default=None)
    got = remote_steps[-1] if remote_steps else None
    if PHASES[case.phase].completes:  # the command ended: its last save is committed
        assert newest == 30, f"committed newest {newest}\n{out}"
    if before is not None:  # never older than what was durable when the signal came
        assert got is not None and got >= before, f"regressed below {before}: {got}\n{out}"
    if case.mode == SUP:
        assert rc == 143, f"status {rc}\n{out}"
    elif case.ranks == 1 and case.first == signal.SIGTERM:
        assert rc == 143, f"status {rc}\n{out}"    # a notice in process: the interruption save
    elif case.ranks == 1:
        # SIGINT is Ctrl-C in process (KeyboardInterrupt: died of SIGINT); a SIGTERM sent at
        # once after it in close is taken after the Checkpointer let go of the signals
        late = case.phase == "close" and case.second == signal.SIGTERM
        assert rc == -signal.SIGINT or (late and rc == -signal.SIGTERM), f"status {rc}\n{out}"
    notice_handled = rc == 143 if case.ranks == 1 or case.mode == SUP else case.first == signal.SIGTERM
    if notice_handled:
        assert got == newest, f"status {rc}: remote newest {got}, committed newest {newest}\n{out}"
    else:  # no notice (a Ctrl-C in process): the newest state, or what was durable before
        assert got is None or got in _committed(local, case.ranks) or got == before, f"remote {got}\n{out}"


@pytest.mark.parametrize("case, backend", [pytest.param(c, b, id=f"{c}-{b}", marks=_marks(c, b)) for c, b in _cases()])
def test_a_signal_at_every_phase_leaves_the_newest_or_the_previous_state_durable(
        tmp_path: Path, request: pytest.FixtureRequest, case: Case, backend: str) -> None:
    server = request.getfixturevalue("rgw_server" if backend == "rgw" else "moto_server")
    bucket = server.new_bucket()
    remote = f"s3://{bucket}/run/"
    spec = PHASES[case.phase]
    entry = spec.pause[case.ranks]
    local = tmp_path / "local"
    if spec.base:  # an earlier instance's durable checkpoint, then a new instance
        argv, env = _argv(case, tmp_path / "earlier", remote, 10)
        r = run(argv, env=run_env(**server.env(), **env), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        if spec.same_disk and case.ranks == 1:  # step 20 committed there only (no remote)
            local = tmp_path / "earlier"
            r = run(_command(case, 20), env=run_env(SPOTCKPT_LOCAL_DIR=str(local)), timeout=300)
            assert r.returncode == 0 and LocalDir(local).committed()[-1] == 20, r.stdout + r.stderr
    then = _followup(case) if case.second is not None else None
    pauses = Pauses(tmp_path / "pauses", *[e for e in (entry, then) if e])
    argv, env = _argv(case, local, remote, 30 if spec.completes else 100_000)
    p = Proc(argv, env=run_env(**server.env(), **env, **pauses.env()))
    try:
        if entry:
            per_rank = not entry.startswith("supervisor:")
            pauses.wait(entry, count=case.ranks if per_rank else 1, proc=p.p)
        else:
            p.wait_for(r"^step 20$", 180)
        target = _rank0(p) if case.mode == INP and case.ranks == 2 else p.pid
        before = _durable(server, bucket)
        os.kill(target, case.first)
        if case.second is not None and then is None:
            os.kill(target, case.second)  # no later point to wait for: at once
        if entry:
            pauses.release(entry)
        if then is not None:
            try:
                pauses.wait(then, proc=p.p)  # the first signal was taken: now the second
                os.kill(target, case.second)
            except AssertionError:
                pass  # it ended first (a Ctrl-C's KeyboardInterrupt in open): nothing to hit
            pauses.release(then)
        rc = p.finish(300)
    finally:
        pauses.release_all()
        p.kill()
    out = f"--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    # no error of ours (torchrun prints its own traceback when its workers exit 143); but a
    # Ctrl-C to one rank in process ends that rank, and the others say so (RankLostError)
    errors = _errors_of_ours(p.stderr)
    if case.mode == INP and case.ranks == 2 and case.first == signal.SIGINT:
        errors = [e for e in errors if "RankLostError" not in e and "gloo" not in e]  # (its cause)
    assert not errors, out
    steps, _ = remote_audit(server, bucket, "run/")   # every remote manifest verified
    _check(case, rc, local, steps, before, out)
    if case.ranks == 1:  # a new instance resumes from the remote's newest
        r = run([PY, COUNTER, "--steps", str(steps[-1] if steps else 0)],
                env=run_env(**server.env(), SPOTCKPT_LOCAL_DIR=str(tmp_path / "next"), SPOTCKPT_REMOTE=remote),
                timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"resumed at step {steps[-1] if steps else None}" in r.stdout, r.stdout
