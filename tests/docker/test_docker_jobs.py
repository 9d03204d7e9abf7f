"""Training jobs in the image on a real engine: Docker's default stop timeout with a save that does
not fit, `docker kill`, an unmodified SageMaker-style script with /opt/ml mounted, a Lightning
job, and two containers of one job on one remote (the fence).

Every container reaches the suite's moto server on the host's loopback (``--network=host``);
a "new container" is a new `docker run` with an empty local dir, as on a new spot instance.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from docker_fixtures import Engine, durable_step
from proc_helpers import REPO, wait_until
from throttle_proxy import ThrottleProxy

from spotckpt._remote._store import RemoteStore

# the first test of a worker may wait for the image to be built (a few minutes cold)
pytestmark = pytest.mark.timeout(1500)

SCRIPTS = REPO / "tests" / "scripts"


def _events(ml: Path) -> list[dict]:
    """The events of the container's state dir (/opt/ml/.checkpoints.spotckpt, mounted)."""
    p = ml / ".checkpoints.spotckpt" / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.slow
def test_docker_default_stop_timeout_with_a_save_that_does_not_fit(spotckpt_image: Engine, s3_server,
                                                                  s3_remote: str, tmp_path: Path, figure) -> None:
    """`docker stop` with Docker's default 10 s, SPOTCKPT_GRACE_SECONDS=10, an 8 MiB state and
    uploads at 1 MiB/s: a new save plus its upload (~10 s) does not fit, so the documented
    choice is to finish the upload in flight; the container exits 143 before the SIGKILL
    (its flush ends 1.5 s before the deadline; it used to keep 0.5 s and race the SIGKILL)
    and says which step is durable."""
    u = urlparse(s3_server.endpoint)
    proxy = ThrottleProxy((u.hostname, u.port), up_bps=1.0 * 2**20)
    ml = tmp_path / "ml"
    ml.mkdir()
    env = {**s3_server.env(), "AWS_ENDPOINT_URL_S3": proxy.url, "SPOTCKPT_REMOTE": s3_remote,
           "SPOTCKPT_GRACE_SECONDS": "10"}
    try:
        c = spotckpt_image.run("python", "/scripts/big_state_train.py", "--mb", "8", env=env,
                               opts=["--network=host", "-v", f"{ml}:/opt/ml", "-v", f"{SCRIPTS}:/scripts:ro"])
        c.wait_for("^training$", 300)

        def second_upload_under_way() -> bool:  # one upload measured, the next one started
            ev = _events(ml)
            done = [e for e in ev if e["event"] == "upload_done"]
            started = [e for e in ev if e["event"] == "upload_start"]
            return bool(done and started and started[-1]["step"] > done[-1]["step"])

        wait_until(second_upload_under_way, 300, "a measured upload and the next one under way")
        sent = proxy.sent
        in_flight = [e for e in _events(ml) if e["event"] == "upload_start"][-1]["step"]
        # 5 of its 8 MiB sent (by bytes, not seconds: load slows the proxy): the rest needs ~3 s
        wait_until(lambda: proxy.sent - sent >= 5 * 2**20, 300, "the upload in flight 5 MiB in")
        took = c.stop()                           # no -t, no --stop-timeout: Docker's 10 s
        rc = c.finish(60)
    finally:
        proxy.close()
    assert rc == 143, c.output                    # it left by itself: Docker's SIGKILL would be 137
    # ... with the margin it keeps for its own exit (the docker CLI's own time stretches with load)
    left = float(re.search(r"([\d.]+) s left before the deadline", c.stderr).group(1))
    assert left >= 1.0, c.output
    step = durable_step(c.output, s3_remote)
    assert step == in_flight, c.output            # the upload in flight finished, not a new one
    assert f"checkpoint step {step} (0 B)" not in c.output  # its size is not known here, not 0
    assert RemoteStore(s3_remote).committed()[-1] == step
    ev = _events(ml)                              # nothing newer was started in its place
    done_at = next(i for i, e in enumerate(ev) if e["event"] == "upload_done" and e["step"] == in_flight)
    assert not [e for e in ev[:done_at] if e["event"] == "upload_start" and e["step"] > in_flight]
    figure(f"[docker] docker stop (default 10 s), 8 MiB at 1 MiB/s: exit 143, {left:.1f} s before the "
           f"deadline ('docker stop' took {took:.1f} s), step {step} durable (the upload in flight)")


@pytest.mark.slow
def test_docker_kill_the_next_container_resumes_from_the_last_durable_step(spotckpt_image: Engine, s3_server,
                                                                          s3_remote: str) -> None:
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    cmd = ["python", "examples/train_custom_loop.py", "--steps", "3000", "--every-steps", "20", "--sleep", "0.02"]
    first = spotckpt_image.run(*cmd, opts=["--network=host"], env=env)
    store = RemoteStore(s3_remote)
    before = wait_until(lambda: [s for s in store.committed() if s >= 60], 300, "step 60 durable")[-1]
    first.kill()                                  # docker kill: SIGKILL, no warning
    assert first.finish(60) == 137, first.output
    last = store.committed()[-1]
    assert last >= before
    second = spotckpt_image.run(*cmd, opts=["--network=host"], env=env)
    second.wait_for(rf"^resumed at step {last}$", 300)
    second.stop(30)
    assert second.finish(60) == 143, second.output


@pytest.mark.slow
def test_unmodified_sagemaker_style_script_with_opt_ml_mounted(spotckpt_image: Engine, s3_server,
                                                               s3_remote: str, tmp_path: Path) -> None:
    """examples/sagemaker_style_torch.py knows nothing of spotckpt: it saves checkpoint.pth into
    /opt/ml/checkpoints every epoch and loads it at start. /opt/ml is a volume, as on SageMaker;
    the second container gets a new, empty one."""
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    cmd = ["python", "examples/sagemaker_style_torch.py", "--epochs", "12", "--sleep", "0.5",
           "--out", "/opt/ml/model/model.pt"]
    ml1, ml2 = tmp_path / "ml1", tmp_path / "ml2"
    for d in (ml1, ml2):
        (d / "model").mkdir(parents=True)
    first = spotckpt_image.run(*cmd, opts=["--network=host", "-v", f"{ml1}:/opt/ml"], env=env)
    first.wait_for(r"^epoch 3 .* saved$", 300)
    first.stop(30)
    assert first.finish(60) == 143, first.output
    assert (ml1 / "checkpoints" / "checkpoint.pth").is_file()
    saved = torch.load(ml1 / "checkpoints" / "checkpoint.pth", weights_only=True)["epoch"]
    second = spotckpt_image.run(*cmd, opts=["--network=host", "-v", f"{ml2}:/opt/ml"], env=env)
    second.wait_for(rf"^resumed from checkpoint.pth at epoch {saved + 1}$", 300)
    assert second.finish(300) == 0, second.output
    assert (ml2 / "model" / "model.pt").is_file()


@pytest.mark.slow
def test_lightning_callback_job_stopped_and_resumed(spotckpt_image: Engine, s3_server, s3_remote: str) -> None:
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    cmd = ["python", "examples/train_lightning.py", "--max-epochs", "4", "--every-steps", "10", "--sleep", "0.05"]
    first = spotckpt_image.run(*cmd, opts=["--network=host"], env=env)
    first.wait_for(r"^step 40 ", 300)
    first.stop(30)
    assert first.finish(60) == 143, first.output
    step = durable_step(first.output, s3_remote)
    assert step is not None and step >= 40, first.output
    second = spotckpt_image.run(*cmd, opts=["--network=host"], env=env)
    second.wait_for(rf"^resumed at step {step}$", 300)
    assert second.finish(300) == 0, second.output
    assert "finished at step 128" in second.output


@pytest.mark.slow
def test_two_containers_of_one_job_the_fence_stops_the_older(spotckpt_image: Engine, s3_server,
                                                             s3_remote: str) -> None:
    """A replacement started while the old container still runs (a double launch, a zombie
    instance): the replacement claims a newer generation; the old one stops at its next
    commit with exit status 3 and one line, without overwriting anything newer."""
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    cmd = ["python", "examples/train_custom_loop.py", "--steps", "100000", "--every-steps", "20", "--sleep", "0.02"]
    store = RemoteStore(s3_remote)
    old = spotckpt_image.run(*cmd, opts=["--network=host"], env=env)
    wait_until(lambda: store.committed(), 300, "a durable step of the first container")
    new = spotckpt_image.run(*cmd, opts=["--network=host"], env=env)
    new.wait_for(r"^resumed at step \d+$", 300)
    try:
        assert old.finish(300) == 3, old.output
    finally:
        new.stop(30)
    assert new.finish(60) == 143, new.output
    lines = [x for x in old.stderr.splitlines() if "StaleGenerationError" in x]
    assert len(lines) == 1, old.output
