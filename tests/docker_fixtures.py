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

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
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
    image_error: BaseException | None = None
    error: str | None = None
    down: list[str] | None = None


_STARTED: list[str] = []


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Remove the containers a test started: one that failed early must not train on, taking
    the shared cores, until the session ends."""
    if _STARTED:
        eng.cli("rm", "-f", *_STARTED, check=False, timeout=300)
        _STARTED.clear()


class Container(Proc):
    """``docker run`` attached (no ``-d``): the CLI's stdout/stderr are the container's, its exit
    status the container's (125: docker could not run it)."""

    def __init__(self, image: str, cmd: list[str], *, opts: list[str] = (), env: dict[str, str] | None = None,
                 name: str | None = None) -> None:
        self.name = name or f"spotckpt-t-{uuid.uuid4().hex[:10]}"
        e = [x for k, v in (env or {}).items() for x in ("-e", f"{k}={v}")]
        argv = [eng.CLI, "run", "--name", self.name, "--label", LABEL, *opts, *e, image, *cmd]
        super().__init__(argv, env=dict(os.environ, **eng.env_vars()))
        _STARTED.append(self.name)  # removed when the test ends, whatever happened

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


def _not_run() -> None:
    msg = f"Docker leg not run: {_S.error}"
    if DOCKER_REQUIRED and DOCKER_ENABLED:
        pytest.fail(msg + " (SPOTCKPT_REQUIRE_DOCKER=1)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    _bring_up()
    if _S.error is not None:
        _not_run()
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
    """``docker/Dockerfile`` built from this checkout, offline. A failed ``docker build`` fails
    the tests (it is the code under test); a wheelhouse that cannot be made (no package index
    reachable from the host) is the machine, as a failed bring-up: skipped or failed."""
    if _S.image is None and _S.image_error is None:
        try:
            _S.image = docker_image.build(REPO, EXTRAS, lease=os.getpid())
        except docker_image.BuildError as e:
            _S.image_error = e
        except (eng.DockerError, OSError, subprocess.SubprocessError) as e:
            _S.error = "the image's prerequisites: " + (str(e).splitlines()[0] if str(e) else type(e).__name__)
    if _S.image_error is not None:
        raise _S.image_error
    if _S.image is None:
        _not_run()
    return Engine(_S.image["tag"])


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def _describe(up: dict | None, image: dict | None, *, quiet: bool) -> list[str]:
    """What bringing the engine up and building the image did; ``quiet``: leave out what
    was merely found there (a worker that reused the engine and the image says nothing)."""
    out = []
    if up is not None:
        inst = f" (packages installed in {up['install_s']:.0f} s)" if up["install_s"] is not None else ""
        if up["started"] or not quiet:
            out.append(f"engine up in {up['up_s']:.1f} s{inst}" if up["started"] else "reused a running engine")
        b = up["base"]
        if b["how"] != "present" or not quiet:
            out.append(f"base image {b['how']} ({b['seconds']:.0f} s)")
    if image is not None and (image["how"] != "present" or not quiet):
        wh = image["wheelhouse"]
        ctx = (f", context {_mb(image['context_bytes'])} with a {_mb(image['wheelhouse_bytes'])} wheelhouse"
               if image["context_bytes"] else "")
        out.append(f"image {image['how']} in {image['seconds']:.0f} s (wheelhouse {wh['how']} "
                   f"{wh['seconds']:.0f} s{ctx})")
    return out


def docker_line() -> str | None:
    """One summary line for this process (the xdist controller: the background preparation
    and the tear-down; a worker: only what it did itself, or an error)."""
    parts = []
    if _P.result is not None:
        r = _P.result
        if "error" in r:
            parts.append(f"background preparation failed after {r['seconds']:.0f} s: {r['error']}")
        else:
            parts.append(f"prepared in the background in {r['seconds']:.0f} s: "
                         + "; ".join(_describe(r["up"], r["image"], quiet=False)))
    parts += _describe(_S.up, _S.image, quiet=_P.result is not None or _P.worker)
    if _S.image_error is not None:
        parts.append("IMAGE BUILD FAILED")
    if _S.error is not None:
        parts.append(f"DOCKER LEG NOT RUN ({'failed' if DOCKER_REQUIRED and DOCKER_ENABLED else 'skipped'}): "
                     f"{_S.error}")
    if _S.down is not None:
        parts.append("engine stopped, host clean (no dockerd, no mount, ip_forward, firewall and network "
                     "devices unchanged)" if not _S.down else "ENGINE TEAR-DOWN NOT CLEAN: " + "; ".join(_S.down))
    return "[docker] " + "; ".join(parts) if parts else None


# -- ahead of the first Docker test --------------------------------------------------------------
class _P:
    """The background preparation (engine, base image, wheelhouse, image), started by the
    process that runs the session once it knows Docker tests were collected, so that the
    cold bring-up (minutes) overlaps the rest of the suite instead of holding a worker."""
    proc: subprocess.Popen | None = None
    log: Path | None = None
    result: dict | None = None
    worker = False


def _is_docker(nodeid: str) -> bool:
    return nodeid.replace("\\", "/").startswith("tests/docker/")


def _prepare_in_background() -> None:
    if _P.proc is not None or not DOCKER_ENABLED or os.geteuid() != 0:
        return
    _P.log = Path(tempfile.mkstemp(prefix="spotckpt-docker-prepare-", suffix=".log")[1])
    with open(_P.log, "wb") as f:  # the lease is this process's: the engine stays up until it ends
        _P.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "servers" / "docker_cli.py"), "prepare",
                                    "--lease", str(os.getpid()), "--extras", EXTRAS],
                                   stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)


def pytest_configure(config: pytest.Config) -> None:
    _P.worker = hasattr(config, "workerinput")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Docker tests last (a stable sort, the same in every worker): by the time a worker
    gets there, the background preparation is done; pytest-xdist's work stealing still
    spreads them over the workers."""
    items.sort(key=lambda item: _is_docker(item.nodeid))


def pytest_collection_finish(session: pytest.Session) -> None:
    if not _P.worker and any(_is_docker(item.nodeid) for item in session.items):
        _prepare_in_background()   # a run without pytest-xdist


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:  # on the controller
    if any(_is_docker(i) for i in ids):
        _prepare_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The process that started the preparation holds a lease: once every worker is done,
    drop it; as the last tenant it stops the engine and checks the host."""
    if _P.proc is None:
        return
    if _P.proc.poll() is None:  # the session ended first (-x, Ctrl-C): stop it and its children
        os.killpg(_P.proc.pid, signal.SIGTERM)
        try:
            _P.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(_P.proc.pid, signal.SIGKILL)
            _P.proc.wait()
    text = _P.log.read_text(errors="replace").strip() if _P.log else ""
    try:
        _P.result = json.loads(text.splitlines()[-1])
    except (ValueError, IndexError):
        _P.result = {"error": (text.splitlines() or ["no output"])[-1][:300], "seconds": 0.0}
    if _P.log is not None:
        _P.log.unlink(missing_ok=True)
    problems = eng.release(os.getpid())
    if problems is not None:
        _S.down = problems
        if problems:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def durable_step(output: str, remote: str) -> int | None:
    """The step ``spotckpt run`` reported durable at ``remote`` as it ended (None: none), from
    "durable at R: checkpoint step N" or "NOT everything is durable at R (...): ...; durable:
    checkpoint step N"."""
    for line in output.splitlines():
        if line.startswith("spotckpt run: ") and f"durable at {remote}" in line:
            m = re.search(rf"(?:durable at {re.escape(remote)}|; durable): checkpoint step (\d+)", line)
            return int(m.group(1)) if m else None
    return None
