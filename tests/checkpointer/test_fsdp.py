"""Sharded state (FSDP2 ``fully_shard``, CPU, gloo) under torchrun, and world-size changes.

A sharded state is written through torch.distributed.checkpoint into each rank's part and
restored at any world size: 2 ranks -> 1 -> 2, the full (gathered) model and optimizer state
right after each resume equal to what was saved. A SIGTERM to one rank of the 2-rank run
resumes bitwise at the same world size. A checkpoint that cannot be resharded (per-rank
``state.pt``, or a sharded one for a job whose state is not sharded) stops the job at once
with an error naming both world sizes, never a fresh start beside the old checkpoints."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXAMPLES, free_port, run_env

from spotckpt._remote._store import RemoteStore

FSDP = str(EXAMPLES / "train_fsdp.py")
DDP = str(EXAMPLES / "train_ddp.py")


def torchrun(nproc: int, script: str, local: Path, remote: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), script, *args],
        env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=remote, GLOO_SOCKET_IFNAME="lo",
                    SPOTCKPT_GRACE_SECONDS="30"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# torch 2.13's gloo: a worker thread of the default group may release a finished
# collective's tensors (here the script's final all-gather of the full state) only once the
# interpreter is finalizing; asking for the GIL then ends the thread inside a noexcept
# destructor: std::terminate, SIGABRT, after the script's last line. It is torch's: core
# dumps show the default group's worker (spotckpt's own groups are gone by then, see the
# last test), and it happens with spotckpt removed from the script (1 in 30 runs of
# examples/train_fsdp.py under load; cf. pytorch/pytorch#179291). Tolerated only when
# every rank printed its last line, i.e. after everything the script does.
TORCH_EXIT_ABORT = "terminate called without an active exception"


def ended_ok(returncode: int, out: str, nproc: int) -> bool:
    """Exit status 0, or torch's abort at interpreter exit after every rank's last line."""
    if returncode == 0:
        return True
    if TORCH_EXIT_ABORT in out and len(set(re.findall(r"rank (\d) exiting", out))) == nproc:
        warnings.warn(f"[fsdp] torch's gloo abort at interpreter exit after every rank's last line "
                      f"(tolerated): exit {returncode}")  # (listed in pytest's warnings summary)
        return True
    return False


def run_ok(nproc: int, local: Path, remote: str, *args: str) -> str:
    proc = torchrun(nproc, FSDP, local, remote, *args)
    out, _ = proc.communicate(timeout=300)
    assert ended_ok(proc.returncode, out, nproc), out
    return out


def resumed_at(out: str) -> set[str]:
    return set(re.findall(r"rank \d pid \d+ world \d resumed at step (\d+)", out))


def assert_same(a_path: Path, b_path: Path) -> None:
    """Full model and optimizer states (nested dicts of tensors) bitwise equal."""
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    n = 0

    def walk(x: Any, y: Any, where: str) -> None:
        nonlocal n
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
            n += 1
        elif isinstance(x, dict):
            assert set(x) == set(y), (where, set(x) ^ set(y))
            for k in x:
                walk(x[k], y[k], f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}/{i}")
        else:
            assert x == y, (where, x, y)
    walk(a, b, "")
    assert set(a) == {"model", "optim"} and n == 4 + 4 * 3, n  # 4 params; step, exp_avg, exp_avg_sq each


@pytest.mark.slow
def test_reshard_2_to_1_to_2_local_only(tmp_path: Path) -> None:
    """One host without a remote: the ranks commit through <local_dir>/shared/. Before, a
    1-rank restart of the 2-rank checkpoint started silently from step 0."""
    local = tmp_path / "ck"
    run_ok(2, local, "", "--steps", "20", "--out", str(tmp_path / "a.pt"))

    out = run_ok(1, local, "", "--steps", "30", "--out-resumed", str(tmp_path / "b0.pt"),
                 "--out", str(tmp_path / "b.pt"))
    assert resumed_at(out) == {"20"} and "written by 2 rank(s); resharded to 1" in out, out
    assert_same(tmp_path / "a.pt", tmp_path / "b0.pt")

    out = run_ok(2, local, "", "--steps", "30", "--out-resumed", str(tmp_path / "c0.pt"))
    assert resumed_at(out) == {"30"} and out.count("resumed at step 30") == 2, out
    assert out.count("written by 1 rank(s); resharded to 2") == 2, out
    assert_same(tmp_path / "b.pt", tmp_path / "c0.pt")

    # A process whose state is not sharded cannot take the sharded checkpoint: it says so.
    code = ("import torch, spotckpt; m = torch.nn.Linear(16, 1)\n"
            "with spotckpt.Checkpointer({'model': m}) as ck: print('started at', ck.step)")
    p = subprocess.run([sys.executable, "-c", code], env=run_env(SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=""),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "started at" not in p.stdout, p.stdout + p.stderr
    assert "WorldSizeError" in p.stderr and "written by 1 rank(s) (torch.distributed)" in p.stderr, p.stderr
    assert "It is sharded (DCP)" in p.stderr, p.stderr


@pytest.mark.slow
def test_sigterm_2_ranks_resumes_bitwise_then_reshards_to_1_from_s3(tmp_path: Path, s3_remote: str) -> None:
    steps = "60"
    common = ["--steps", steps, "--every-steps", "10", "--sleep", "0.03"]
    ref = tmp_path / "ref.pt"
    run_ok(2, tmp_path / "ref-local", f"file://{tmp_path}/ref-remote/", *common, "--out", str(ref))

    proc = torchrun(2, FSDP, tmp_path / "local-1", s3_remote, *common)
    pids, head = {}, []
    for line in proc.stdout:
        head.append(line)
        for m in re.finditer(r"rank (\d) pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
        if len(pids) == 2:
            break
    assert len(pids) == 2, "".join(head)
    time.sleep(random.uniform(0.2, 1.5))
    os.kill(pids[random.choice([0, 1])], signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "143" in "".join(head) + out, "".join(head) + out
    store = RemoteStore(s3_remote)
    stop = store.committed()[-1]
    assert 0 < stop < int(steps), stop
    m = store.read_manifest(stop)
    assert m.world_size == 2 and m.serializer == "dcp" and sorted(f.path for f in m.files) == [
        "rank-00000/.metadata", "rank-00000/__0_0.distcp", "rank-00000/state.pt",
        "rank-00001/__1_0.distcp", "rank-00001/state.pt"]

    final = tmp_path / "final.pt"
    out = run_ok(2, tmp_path / "local-2", s3_remote, *common, "--out", str(final))  # new containers
    assert resumed_at(out) == {str(stop)} and out.count("resumed at") == 2, out
    assert_same(ref, final)

    out = run_ok(1, tmp_path / "local-3", s3_remote, "--steps", steps, "--out-resumed", str(tmp_path / "one.pt"))
    assert resumed_at(out) == {steps}, out
    assert_same(final, tmp_path / "one.pt")


@pytest.mark.slow
def test_world_size_change_of_per_rank_state_is_a_clear_error(tmp_path: Path, s3_remote: str) -> None:
    """DDP: every rank saves a plain state.pt; it cannot be resharded. Before, a 1-rank
    restart failed late with FileNotFoundError (.../step-N/state.pt)."""
    proc = torchrun(2, DDP, tmp_path / "l1", s3_remote, "--steps", "10", "--every-steps", "5")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    proc = torchrun(1, DDP, tmp_path / "l2", s3_remote, "--steps", "20")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    assert "fresh start" not in out and "resumed" not in out, out
    assert "WorldSizeError" in out and "step 10" in out, out
    assert "written by 2 rank(s) (torch.distributed); this job has 1 process" in out, out
    assert "per rank (state.safetensors or state.pt) and cannot be resharded" in out, out


@pytest.mark.slow
def test_save_before_first_optimizer_step_leaves_the_optimizer_unstepped(tmp_path: Path) -> None:
    """get_optimizer_state_dict initialises an empty optimizer with a zero-gradient step
    (Adam's step count then runs one ahead of an uninterrupted run); spotckpt must not."""
    script = Path(__file__).parents[1] / "scripts" / "fsdp_unstepped.py"
    outs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True,
                           timeout=120, env=run_env(SPOTCKPT_LOCAL_DIR=str(tmp_path / "ck"), SPOTCKPT_REMOTE=""))
        assert p.returncode == 0, p.stdout + p.stderr
        outs.append(p.stdout)
    assert "restored None state 0" in outs[0] and "after save: state 0" in outs[0], outs[0]
    assert "restored 0 state 0" in outs[1], outs[1]


def test_close_destroys_spotckpts_process_groups_and_joins_their_threads(tmp_path: Path) -> None:
    """The rare SIGABRT at exit ("terminate called without an active exception"): a gloo
    worker thread released a collective's tensors during the interpreter's finalization. The
    groups spotckpt made were alive until then (the Checkpointer was kept by a reference
    cycle, its groups never destroyed): now close() destroys them and joins their threads."""
    script = Path(__file__).parents[1] / "scripts" / "dist_release.py"
    p = subprocess.run([sys.executable, str(script), str(free_port())], capture_output=True, text=True,
                       timeout=120, env=run_env(SPOTCKPT_LOCAL_DIR=str(tmp_path / "ck"), SPOTCKPT_REMOTE=""))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    made = re.search(r"groups made 2 threads (\d+)", p.stdout)
    assert made and int(made.group(1)) >= 4, out  # each gloo group: a tcp loop and two workers
    assert "groups registered 0" in p.stdout and "groups alive 0" in p.stdout, out
    assert "threads left 0" in p.stdout, out
    assert "checkpointer alive 0" in p.stdout, out


@pytest.mark.slow
def test_each_rank_downloads_only_the_shards_it_loads(tmp_path: Path, s3_server, s3_remote: str, figure) -> None:
    """Issue 25 item 6: a sharded (DCP) step restored by 2 ranks on new machines. Each rank
    downloads DCP's ``.metadata``, its own plain part and the shard files holding the pieces
    it loads (DCP's load planner over ``.metadata`` says which), not every rank's part (before:
    each rank the whole step). A file is fetched whole, so that it is verified before it is
    loaded: a rank whose pieces include a replicated tensor that DCP saved in another rank's
    file (it spreads them over the ranks) fetches that file too."""
    import json

    from faultproxy import FaultProxy

    run_ok(2, tmp_path / "local-1", s3_remote, "--steps", "20", "--every-steps", "10", "--out", str(tmp_path / "a.pt"))
    store = RemoteStore(s3_remote)
    step = store.committed()[-1]
    sizes = {f.path: f.size for f in store.read_manifest(step).files}
    with FaultProxy(s3_server.endpoint, rate=0.0) as proxy:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(free_port()), FSDP, "--steps", "20", "--out-resumed", str(tmp_path / "b.pt")],
            env=run_env(SPOTCKPT_LOCAL_DIR=str(tmp_path / "local-2"), SPOTCKPT_REMOTE=s3_remote,
                        GLOO_SOCKET_IFNAME="lo", SPOTCKPT_GRACE_SECONDS="30", AWS_ENDPOINT_URL_S3=proxy.endpoint),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=300)
        assert ended_ok(proc.returncode, out, 2), out
        gets = [p.split("?")[0] for mth, p, _ in proxy.log if mth == "GET" and "/step-" in p]
    assert resumed_at(out) == {str(step)} and out.count("resumed at") == 2, out
    assert_same(tmp_path / "a.pt", tmp_path / "b.pt")
    # per rank, from its own event log: the bytes it downloaded
    per_rank = {}
    logs = [p for p in tmp_path.rglob("events.jsonl") if "local-2" in str(p)]
    for log in logs:
        for line in log.read_text().splitlines():
            e = json.loads(line)
            if e["event"] == "restore" and e.get("source") == "remote" and "rank" in e:
                per_rank[e["rank"]] = e["bytes"]
    whole = sum(sizes.values())
    assert sorted(per_rank) == [0, 1] and all(b < whole for b in per_rank.values()), (per_rank, whole, logs)
    # and at the server: the GETs of payload bytes add up to the same, less than a step per rank
    fetched = sum(sizes[path] for p in gets for path in sizes if p.endswith("/" + path))
    assert fetched == sum(per_rank.values()) < 2 * whole, (fetched, per_rank, whole, gets)
    own = {r: sizes[f"rank-{r:05d}/__{r}_0.distcp"] for r in (0, 1)}
    assert all(per_rank[r] >= own[r] for r in (0, 1)), (per_rank, own)
    figure(f"[dcp] 2-rank FSDP restore of a {whole}-byte step: rank 0 downloaded {per_rank[0]} bytes, "
           f"rank 1 {per_rank[1]} (before: {whole} each)")
