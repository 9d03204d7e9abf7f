"""`docker stop` of the image built from docker/Dockerfile, on a real engine, against the suite's S3
servers on the host's loopback (moto and RGW, through ``--network=host``).

The image's entrypoint (`spotckpt run --`) is PID 1: Docker's SIGTERM reaches it, it forwards
it to the training command, whose Checkpointer saves at the next step; the supervisor uploads
it, says what is durable and exits 143 before Docker's SIGKILL. A new container (an empty
local dir, as on a new instance) resumes from the remote, and its final weights are bitwise
those of an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from docker_fixtures import Engine, durable_step

from spotckpt._remote._store import RemoteStore

# the first test of a worker may wait for the image to be built (a few minutes cold)
pytestmark = pytest.mark.timeout(1500)

STEPS, EVERY = 300, 50
TRAIN = ["python", "examples/train_custom_loop.py", "--steps", str(STEPS), "--every-steps", str(EVERY),
         "--sleep", "0.03", "--out", "/out/final.pt"]


@pytest.fixture(scope="session")
def reference_weights(spotckpt_image: Engine, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same training, uninterrupted, in the same image (a file:// remote inside it)."""
    out = tmp_path_factory.mktemp("docker-ref")
    c = spotckpt_image.run(*TRAIN, opts=["--network=none", "-v", f"{out}:/out"],
                           env={"SPOTCKPT_REMOTE": "file:///tmp/remote/"})
    assert c.finish(600) == 0, c.output
    return torch.load(out / "final.pt", weights_only=True)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_docker_stop_makes_the_step_durable_and_a_new_container_resumes_bitwise(
        spotckpt_image: Engine, s3_server, s3_remote: str, reference_weights: dict, tmp_path: Path,
        figure) -> None:
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    out = tmp_path / "out"
    out.mkdir()
    opts = ["--network=host", "-v", f"{out}:/out"]
    first = spotckpt_image.run(*TRAIN, opts=opts, env=env)
    first.wait_for(r"^step 100 ", 300)
    took = first.stop(30)                        # docker stop -t 30: SIGTERM, SIGKILL after 30 s
    assert first.finish(60) == 143, first.output   # by itself: Docker's SIGKILL would be 137
    step = durable_step(first.output, s3_remote)
    assert step is not None and 100 < step < STEPS, first.output
    assert RemoteStore(s3_remote).committed()[-1] == step   # what it said is on the remote
    figure(f"[docker] docker stop -t 30 ({s3_server.kind}): exit 143 after {took:.1f} s, step {step} durable")

    second = spotckpt_image.run(*TRAIN, opts=opts, env=env)  # a new container: empty local dir
    second.wait_for(rf"^resumed at step {step}$", 300)
    assert second.finish(600) == 0, second.output
    assert _equal(torch.load(out / "final.pt", weights_only=True), reference_weights)
