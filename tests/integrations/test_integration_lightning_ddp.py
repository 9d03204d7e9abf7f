"""Lightning DDP on CPU, 2 ranks (gloo): examples/train_lightning_ddp.py with SpotCheckpoint.

One job, interrupted twice, on the S3 server: a SIGTERM to one rank's pid at a random moment
stops both ranks after the same batch, each rank's part is durable and the job exits 143; each
restart gets empty local dirs (new machines) and resumes both ranks from that step; the final
weights are bitwise those of an uninterrupted 2-rank run. The launch styles alternate, so a
checkpoint from one resumes under the other: Lightning starting rank 1 itself (SIGTERM to that
child rank, whose signal Lightning's own handling would ignore), then torchrun (SIGTERM to
rank 0), then Lightning again to the end."""
from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import EXAMPLES, S3Server, free_port
from test_integration_common import remote_steps, script_env
from spotckpt._commit._local import LocalDir

pytestmark = pytest.mark.slow  # real training runs: not in make test-fast

SCRIPT = str(EXAMPLES / "train_lightning_ddp.py")
EPOCHS, STEPS_PER_EPOCH, EVERY = 3, 32, 10
TOTAL = EPOCHS * STEPS_PER_EPOCH
SLEEP = 0.05  # seconds per step in the interrupted runs, so a SIGTERM lands mid-training
ARGS = ["--devices", "2", "--max-epochs", str(EPOCHS), "--every-steps", str(EVERY)]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_rank_left_behind() -> Iterator[None]:
    """A failed test must not leave ranks running (a hung one would wait for its peer)."""
    yield
    while _started:
        proc = _started.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the job's own session: every rank, orphans too
        except ProcessLookupError:
            pass
        proc.wait()


def launch(style: str, env: dict[str, str], args: list[str], script: str | Path = SCRIPT) -> subprocess.Popen:
    """Start the 2-rank job, in a session of its own: ``lightning`` runs the script and
    Lightning starts rank 1 as its child; ``torchrun`` starts both ranks."""
    env = dict(env, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if style == "lightning":
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", env["MASTER_PORT"], str(script)]
    proc = subprocess.Popen([*cmd, *ARGS, *args], env=env, cwd=str(EXAMPLES.parent), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _started.append(proc)
    return proc


def rank_pids(proc: subprocess.Popen) -> tuple[dict[int, int], list[str]]:
    """The pid of each rank, from the lines the ranks print when training starts."""
    pids, lines = {}, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        for m in re.finditer(r"rank (\d) pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if len(pids) == 2:
            return pids, lines
    raise AssertionError("the ranks did not start training: " + "".join(lines))


def wait_gone(pid: int, timeout: float) -> None:
    """Wait until process ``pid`` has exited (a zombie counts: it is not ours to reap)."""
    end = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        assert time.monotonic() < end, f"rank pid {pid} still running {timeout} s after the job ended"
        time.sleep(0.1)


def events(local: Path, rank: int) -> list[dict]:
    p = LocalDir(local).part(f"rank-{rank:05d}").meta / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def run_to_end(style: str, env: dict[str, str], args: list[str]) -> str:
    proc = launch(style, env, args)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> dict:
    """One uninterrupted 2-rank run, the first of its job."""
    tmp = tmp_path_factory.mktemp("lightning-ddp-ref")
    out = run_to_end("torchrun", script_env(s3_server, tmp / "local", f"file://{tmp}/remote/"),
                     ["--out", str(tmp / "ref.pt")])
    assert sorted(re.findall(r"rank (\d) pid \d+ fresh start at step 0", out)) == ["0", "1"], out
    assert f"finished at step {TOTAL}" in out, out
    return torch.load(tmp / "ref.pt")


# The example, with rank 0 slow to exit: Lightning's launcher watches the ranks it started every
# 5 s and SIGKILLs everything, rank 0 included, once one has exited non-zero; so its ranks must
# exit after rank 0, or the job's status would be 137 instead of 143.
SLOW_RANK0_EXIT = """
import atexit, os, sys, time
sys.path.insert(0, {examples!r})
import train_lightning_ddp as ex
atexit.register(lambda: os.environ.get("LOCAL_RANK", "0") == "0" and time.sleep(6))
ex.main()
"""


def interrupted_run(style: str, victim: int, env: dict[str, str], local: Path, window: float,
                    script: str | Path = SCRIPT) -> tuple[int, str]:
    """Start the job, SIGTERM rank ``victim`` at a random moment of the first ``window``
    seconds of training, check that both ranks stopped at one step with their parts durable
    and the job exited 143; return that step and the output."""
    proc = launch(style, env, ["--sleep", str(SLEEP)], script)
    pids, head = rank_pids(proc)
    delay = random.uniform(0.1, 1.0) * window
    time.sleep(delay)
    os.kill(pids[victim], signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    out = "".join(head) + out + f"\n[test: SIGTERM to rank {victim} {delay:.2f} s after training started]"
    wait_gone(pids[1 - victim], 30)  # under Lightning's launcher rank 1 is not our child
    if style == "lightning":
        assert proc.returncode == 143, out
    else:
        assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*143", out), out
    # The signalled rank stopped on its SIGTERM, the other on the agreement at the step
    # boundary; both parts were durable before the ranks left.
    notices = {r: next(e for e in events(local, r) if e["event"] == "notice") for r in (0, 1)}
    flushes = {r: next(e for e in events(local, r) if e["event"] == "flush") for r in (0, 1)}
    assert notices[victim]["source"] == "SIGTERM" and notices[1 - victim]["source"] == "peer-rank", notices
    stop = flushes[0]["step"]
    assert flushes[1]["step"] == stop and 0 < stop < TOTAL, (flushes, out)
    assert flushes[0]["durable"] and flushes[1]["durable"], (flushes, out)
    return stop, out


def test_sigterm_one_rank_stops_all_and_resumes_from_s3_bitwise(
        reference: dict, s3_server: S3Server, s3_remote: str, tmp_path: Path) -> None:
    env = functools.partial(script_env, s3_server, remote=s3_remote)
    slow = tmp_path / "slow_rank0_exit.py"
    slow.write_text(SLOW_RANK0_EXIT.format(examples=str(EXAMPLES)))
    stop1, out1 = interrupted_run("lightning", 1, env(local=tmp_path / "local-1"), tmp_path / "local-1",
                                  0.4 * TOTAL * SLEEP, slow)
    assert remote_steps(s3_server, s3_remote)[-1] == stop1, out1
    bucket, _, prefix = s3_remote[len("s3://"):].partition("/")
    manifest = json.loads(s3_server.client().get_object(
        Bucket=bucket, Key=f"{prefix}step-{stop1:012d}/MANIFEST.json")["Body"].read())
    assert manifest["world_size"] == 2, manifest
    assert sorted(f["path"].split("/")[0] for f in manifest["files"]) == ["rank-00000", "rank-00001"], manifest

    stop2, out2 = interrupted_run("torchrun", 0, env(local=tmp_path / "local-2"), tmp_path / "local-2",
                                  0.5 * (TOTAL - stop1) * SLEEP)
    assert sorted(re.findall(r"rank (\d) pid \d+ resumed at step (\d+)", out2)) == \
        [("0", str(stop1)), ("1", str(stop1))], out1 + out2
    assert stop1 < stop2 and remote_steps(s3_server, s3_remote)[-1] == stop2, out2

    final = tmp_path / "final.pt"
    out3 = run_to_end("lightning", env(local=tmp_path / "local-3"), ["--out", str(final)])
    assert sorted(re.findall(r"rank (\d) pid \d+ resumed at step (\d+)", out3)) == \
        [("0", str(stop2)), ("1", str(stop2))], out2 + out3
    assert f"finished at step {TOTAL}" in out3, out3
    got = torch.load(final)
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k
