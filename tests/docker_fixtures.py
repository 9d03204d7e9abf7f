"""The real Docker engine in the test suite (a pytest plugin, loaded by tests/conftest.py).

``docker_engine`` brings up the private engine of ``tests/servers/docker_engine.py`` once per
session (a lease per pytest process, so pytest-xdist workers and concurrent runs share one
engine, and the last one out stops it and checks the host is as it was); ``spotckpt_image``
builds ``docker/Dockerfile`` from this checkout with no network (``docker_image.build``).
Without root, or when the engine cannot start, the tests that need it are skipped with one
``[docker]`` line in the summary; ``SPOTCKPT_REQUIRE_DOCKER=1`` (``make test`` as root) makes
that a failure; ``SPOTCKPT_TEST_DOCKER=0`` leaves the leg out.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from typing import Iterator

import pytest
from proc_helpers import REPO, Proc

sys.path.insert(0, str(REPO / "tests" / "servers"))
import docker_engine as eng  # noqa: E402
import docker_image  # noqa: E402

# read at import: the autouse _isolated_env removes SPOTCKPT_* variables inside tests
DOCKER_REQUIRED = os.environ.get("SPOTCKPT_REQUIRE_DOCKER") == "1"
DOCKER_ENABLED = os.environ.get("SPOTCKPT_TEST_DOCKER", "1") != "0"
EXTRAS = "torch,lightning"   # the image the tests run: the Lightning job needs its extra
LABEL = f"spotckpt-test-session={os.getpid()}"


class _S:
    """This process's engine and image, kept for the summary line."""
    up: dict | None = None
    image: dict | None = None
    error: str | None = None
    down: list[str] | None = None


class Container(Proc):
    """``docker run`` attached (no ``-d``): the CLI's stdout/stderr are the container's, its exit
    status the container's (125: docker could not run it)."""

    def __init__(self, image: str, cmd: list[str], *, opts: list[str] = (), env: dict[str, str] | None = None,
                 name: str | None = None) -> None:
        self.name = name or f"spotckpt-t-{uuid.uuid4().hex[:10]}"
        e = [x for k, v in (env or {}).items() for x in ("-e", f"{k}={v}")]
        argv = [eng.CLI, "run", "--name", self.name, "--label", LABEL, *opts, *e, image, *cmd]
        super().__init__(argv, env=dict(os.environ, **eng.env_vars()))

    def running(self) -> bool:
        r = eng.cli("inspect", "-f", "{{.State.Running}}", self.name, check=False, timeout=60)
        return r.stdout.strip() == "true"

    def wait_running(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not self.running():
            if self.p.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"container {self.name} not running (rc={self.p.poll()})\n{self.stderr}")
            time.sleep(0.1)

    def stop(self, t: float | None = None) -> float:
        """``docker stop [-t T]`` (SIGTERM, SIGKILL after T, default: the container's stop
        timeout); the seconds it took."""
        t0 = time.monotonic()
        eng.cli("stop", *(["-t", str(int(t))] if t is not None else []), self.name, timeout=300)
        return time.monotonic() - t0

    def kill(self, signal: str = "KILL") -> None:  # type: ignore[override]
        eng.cli("kill", "-s", signal, self.name, timeout=60)

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return eng.cli("exec", self.name, *cmd, timeout=timeout, check=False)

    def exit_code(self) -> int:
        return int(eng.cli("inspect", "-f", "{{.State.ExitCode}}", self.name, timeout=60).stdout.strip())

    def finish(self, timeout: float = 300.0) -> int:
        try:
            rc = super().finish(timeout)
        except AssertionError:
            eng.cli("rm", "-f", self.name, check=False, timeout=60)
            raise
        code = self.exit_code()  # the engine's word, not only the CLI's
        assert rc == code, f"docker run returned {rc}, the container exited {code}\n{self.stderr}"
        return code

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr


class Engine:
    """The session's engine: ``run`` starts a container of ``image``."""

    def __init__(self, image: str | None = None) -> None:
        self.image = image

    def run(self, *cmd: str, **kw) -> Container:
        assert self.image is not None, "use the spotckpt_image fixture"
        return Container(kw.pop("image", self.image), list(cmd), **kw)


def _bring_up() -> None:
    if not DOCKER_ENABLED:
        _S.error = "SPOTCKPT_TEST_DOCKER=0"
    elif os.geteuid() != 0:
        _S.error = "not root (a private dockerd needs root)"
    else:
        try:
            _S.up = eng.up(lease=os.getpid())
        except (eng.DockerError, OSError, subprocess.SubprocessError) as e:
            _S.error = str(e).splitlines()[0] if str(e) else type(e).__name__


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    _bring_up()
    if _S.error is not None:
        msg = f"Docker leg not run: {_S.error}"
        if DOCKER_REQUIRED and DOCKER_ENABLED:
            pytest.fail(msg + " (SPOTCKPT_REQUIRE_DOCKER=1)", pytrace=False)
        pytest.skip(msg)
    try:
        yield Engine()
    finally:
        ids = eng.cli("ps", "-aq", "--filter", f"label={LABEL}", check=False, timeout=60).stdout.split()
        if ids:
            eng.cli("rm", "-f", *ids, check=False, timeout=300)
        _S.down = eng.release(os.getpid())
        if _S.down:
            pytest.fail("[docker] the engine's tear-down left the host changed: " + "; ".join(_S.down),
                        pytrace=False)


@pytest.fixture(scope="session")
def spotckpt_image(docker_engine: Engine) -> Engine:
    """``docker/Dockerfile`` built from this checkout, offline; a failed build fails the test."""
    if _S.image is None:
        _S.image = docker_image.build(REPO, EXTRAS)
    return Engine(_S.image["tag"])


def _mb(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e6:.0f} MB"


def docker_line() -> str | None:
    if _S.up is not None:
        r = _S.up
        inst = f" (packages installed in {r['install_s']:.0f} s)" if r["install_s"] is not None else ""
        how = f"engine up in {r['up_s']:.1f} s{inst}" if r["started"] else "reused a running engine"
        b = r["base"]
        line = f"[docker] {how}; base image {b['how']} ({b['seconds']:.0f} s)"
        if _S.image is not None:
            i = _S.image
            line += (f"; image {i['how']} in {i['seconds']:.0f} s (wheelhouse {i['wheelhouse']['how']}, "
                     f"{i['wheelhouse']['seconds']:.0f} s; context {_mb(i['context_bytes'])} with a "
                     f"{_mb(i['wheelhouse_bytes'])} wheelhouse)")
        if _S.down is not None:
            line += ("; engine stopped, host clean (no dockerd, no mount, ip_forward and firewall unchanged)"
                     if not _S.down else "; ENGINE TEAR-DOWN NOT CLEAN: " + "; ".join(_S.down))
        return line
    if _S.error is not None:
        return f"[docker] DOCKER LEG NOT RUN ({'failed' if DOCKER_REQUIRED and DOCKER_ENABLED else 'skipped'}): {_S.error}"
    return None


def durable_step(output: str, remote: str) -> int | None:
    """The step ``spotckpt run`` reported durable at ``remote`` as it ended (None: none), from
    "durable at R: checkpoint step N" or "NOT everything is durable at R (...): ...; durable:
    checkpoint step N"."""
    for line in output.splitlines():
        if line.startswith("spotckpt run: ") and f"durable at {remote}" in line:
            m = re.search(rf"(?:durable at {re.escape(remote)}|; durable): checkpoint step (\d+)", line)
            return int(m.group(1)) if m else None
    return None
