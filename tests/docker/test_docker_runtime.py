"""The image under the ways people run containers: with and without `--init`, a child that ignores
SIGTERM, a `--read-only` root filesystem, a non-root `--user`. Each either works or fails at
start with one clear line and exit status 2; none leaves a traceback or a zombie.

Without `--init`, `spotckpt run` is PID 1: it must reap the orphans the command leaves (no
init does it for it) and forward `docker stop`'s SIGTERM (the kernel ignores signals PID 1
has no handler for). With `--init`, Docker's tini is PID 1 and forwards to it.
"""
from __future__ import annotations

import re

from pathlib import Path

import pytest
from docker_fixtures import Container, Engine, durable_step, eng
from proc_helpers import REPO, wait_until

from spotckpt._remote._store import RemoteStore

# the first test of a worker may wait for the image to be built (a few minutes cold)
pytestmark = pytest.mark.timeout(1500)

TRAIN = ["python", "examples/train_custom_loop.py", "--steps", "100000", "--every-steps", "20", "--sleep", "0.02"]
ZOMBIES = ("import os\n"
           "z = [p for p in os.listdir('/proc') if p.isdigit() and open(f'/proc/{p}/stat').read().split(') ')[1][0] == 'Z']\n"
           "print('zombies', len(z))")


def _stop_and_check(c: Container, remote: str) -> float:
    """`docker stop -t 30`: exit 143 (by itself: Docker's SIGKILL is 137), the step it names durable."""
    took = c.stop(30)
    assert c.finish(60) == 143, c.output
    step = durable_step(c.output, remote)
    assert step is not None and RemoteStore(remote).committed()[-1] == step, c.output
    return took


def _one_line_at_start(c: Container, *words: str) -> str:
    """Exit status 2 right away, stderr one line naming ``words``, no traceback."""
    assert c.finish(120) == 2, c.output
    lines = [x for x in c.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in c.output, c.output
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("init", [False, True], ids=["pid1", "init"])
def test_docker_stop_with_and_without_init_reaps_and_flushes(spotckpt_image: Engine, s3_server, s3_remote: str,
                                                             init: bool) -> None:
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    opts = ["--network=host", *(["--init"] if init else [])]
    # a shell that leaves an orphan behind: PID 1 (or tini) must reap it
    c = spotckpt_image.run("sh", "-c", f"(sleep 0.3 &); exec {' '.join(TRAIN)}", opts=opts, env=env)
    c.wait_for(r"^step 100 ", 300)
    top = c.exec("cat", "/proc/1/cmdline").stdout.split("\0")   # PID 1: tini, or spotckpt run itself
    assert "docker-init" in top[0] if init else (top[1].endswith("/spotckpt") and top[2] == "run"), top
    assert c.exec("python", "-c", ZOMBIES).stdout.strip() == "zombies 0"
    _stop_and_check(c, s3_remote)


@pytest.mark.slow
def test_a_child_that_ignores_sigterm_is_killed_before_docker_would(spotckpt_image: Engine, tmp_path: Path) -> None:
    """SPOTCKPT_GRACE_SECONDS=6 under `docker stop -t 30`: the supervisor SIGKILLs the command
    (and what it started) by the grace it was given, and exits 143 itself."""
    code = ("import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen(['sleep', '300']); print('ready', flush=True); time.sleep(300)")
    c = spotckpt_image.run("python", "-c", code, opts=["--network=none"],
                           env={"SPOTCKPT_REMOTE": "file:///tmp/remote/", "SPOTCKPT_GRACE_SECONDS": "6"})
    c.wait_for("^ready$", 300)
    took = c.stop(30)
    assert c.finish(60) == 143, c.output         # not Docker's SIGKILL (137), 30 s on
    assert took < 25 and "killed it (SIGKILL)" in c.stderr, c.output


@pytest.mark.slow
def test_read_only_root_filesystem_with_the_checkpoint_dir_as_a_volume(spotckpt_image: Engine, s3_server,
                                                                      s3_remote: str, tmp_path: Path) -> None:
    """`--read-only`, /opt/ml/checkpoints a volume, /tmp a tmpfs (torch needs a temp dir): the
    state dir has no writable place by default (beside the local dir is read-only, so is
    ~/.local/state), which is one line at start; with SPOTCKPT_STATE_DIR on the tmpfs it runs."""
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    vol = tmp_path / "ckpt"
    vol.mkdir()
    opts = ["--network=host", "--read-only", "--tmpfs", "/tmp", "-v", f"{vol}:/opt/ml/checkpoints"]
    bad = spotckpt_image.run(*TRAIN, opts=opts, env=env)
    _one_line_at_start(bad, "state dir", "SPOTCKPT_STATE_DIR", "Read-only file system")
    assert not list(vol.iterdir())              # nothing started, nothing written

    ok = spotckpt_image.run(*TRAIN, opts=opts, env={**env, "SPOTCKPT_STATE_DIR": "/tmp/spotckpt"})
    ok.wait_for(r"^step 100 ", 300)
    _stop_and_check(ok, s3_remote)
    assert any(p.name.startswith("step-") for p in vol.iterdir())  # the checkpoints are on the volume


@pytest.mark.slow
def test_non_root_user(spotckpt_image: Engine, s3_server, s3_remote: str, tmp_path: Path) -> None:
    """`--user 1000:1000` (no such user in the image, HOME=/): the image's /opt/ml is writable by
    any user, so the default local dir works; a volume the user cannot write is one line."""
    env = {**s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    ok = spotckpt_image.run(*TRAIN, opts=["--network=host", "--user", "1000:1000"], env=env)
    ok.wait_for(r"^step 100 ", 300)
    assert ok.exec("id", "-u").stdout.strip() == "1000"
    _stop_and_check(ok, s3_remote)

    vol = tmp_path / "root-owned"
    vol.mkdir(mode=0o755)
    bad = spotckpt_image.run(*TRAIN, opts=["--network=host", "--user", "1000:1000", "-v", f"{vol}:/opt/ml/checkpoints"],
                             env=env)
    _one_line_at_start(bad, "/opt/ml/checkpoints", "not writable", "SPOTCKPT_LOCAL_DIR")


@pytest.mark.slow
def test_compose_trainer_settings_on_the_engine(spotckpt_image: Engine, s3_server, s3_remote: str) -> None:
    """docker/compose.yaml's trainer, as `docker compose up` would run it, with moto in MinIO's
    place: its environment, its stop_grace_period as the container's stop timeout, the image's
    entrypoint and command; `docker stop` with no -t uses that grace and the save fits in it."""
    yaml = pytest.importorskip("yaml")
    svc = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["trainer"]
    assert "entrypoint" not in svc and "command" not in svc   # the image's: spotckpt run -- python ...
    grace = int(svc["stop_grace_period"].rstrip("s"))
    env = {**svc["environment"], **s3_server.env(), "SPOTCKPT_REMOTE": s3_remote}
    c = spotckpt_image.run(opts=["--network=host", "--stop-timeout", str(grace)], env=env)
    c.wait_for(r"^step 100 ", 300)
    assert eng.cli("inspect", "-f", "{{.Config.StopTimeout}}", c.name).stdout.strip() == str(grace)
    c.stop()                                    # the container's own stop timeout: compose's grace
    assert c.finish(60) == 143, c.output
    # the grace spotckpt planned with is compose's (counted from the signal: what is left of
    # it when the line is written, 29.9 s when forwarding took a moment)
    m = re.search(r"deadline in (\d+\.\d) s", c.stderr)
    assert m and grace - 1 < float(m.group(1)) <= grace, c.stderr
    step = durable_step(c.output, s3_remote)
    assert step is not None and wait_until(lambda: RemoteStore(s3_remote).committed()[-1] == step, 30)
