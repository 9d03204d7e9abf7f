"""Shared fixtures: a real S3 protocol server on loopback and the store backends.

By default the S3 server is moto's server in a subprocess on a free 127.0.0.1 port. Set
``SPOTCKPT_TEST_S3_ENDPOINT`` (plus ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) to run
the same tests against a real MinIO instead.

The modules in ``RGW_MODULES`` also run their S3 tests against Ceph's RADOS Gateway
(``tests/servers/rgw.py``, brought up once per session): ``remote_url`` gains an ``rgw``
leg next to ``file`` and ``s3`` (moto), and a test taking ``s3_server`` directly runs as
``[moto]`` and ``[rgw]``. If RGW cannot start, its leg is skipped with one ``[rgw]`` line in
the summary, or fails when ``SPOTCKPT_REQUIRE_RGW=1`` (``make test`` as root sets it);
``SPOTCKPT_TEST_RGW=0`` leaves the leg out (skipped, with the same line).

The tests in ``tests/docker/`` run against a real Docker engine (``docker_fixtures.py``, a
plugin loaded here): skipped with one ``[docker]`` line without root or an engine, failing
when ``SPOTCKPT_REQUIRE_DOCKER=1``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

pytest_plugins = ["docker_fixtures"]  # the Docker engine's fixtures and its summary line

# A shell starts a background job (`make test &`, nohup, a CI runner without a terminal) with
# SIGINT ignored, and an ignored signal stays ignored across exec: every process a test starts
# would ignore the SIGINT the signal tests send it (they saw a training script run on for
# 300 s). The tests signal their processes as a terminal would, so pytest takes SIGINT's
# default back; a handler set here is SIG_DFL again in a child after exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Test modules whose S3 tests run against both moto and RGW (see the module docstring).
RGW_MODULES = {"test_store_contract", "test_commit_restore", "test_e2e_custom_loop", "test_corruption",
               "test_hostile_remote", "test_chaos_crash", "test_fencing",
               "test_gen_prefix", "test_gen_machine", "test_stale_dir", "test_hostile_prefixes", "test_docker_stop",
               "test_history"}
# read at import: the autouse _isolated_env removes SPOTCKPT_* variables inside tests
RGW_REQUIRED = os.environ.get("SPOTCKPT_REQUIRE_RGW") == "1"
RGW_ENABLED = os.environ.get("SPOTCKPT_TEST_RGW", "1") != "0"


class S3Server:
    def __init__(self, endpoint: str, key: str, secret: str, proc: subprocess.Popen | None,
                 kind: str = "moto") -> None:
        self.endpoint, self.key, self.secret, self.proc = endpoint, key, secret, proc
        self.kind = kind  # "moto", "rgw" or "external" (SPOTCKPT_TEST_S3_ENDPOINT)

    def env(self) -> dict[str, str]:
        """Variables a user would set to point spotckpt (and boto3) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def stop(self) -> None:
        """Stop the server subprocess this fixture started (none for an external MinIO)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def new_bucket(self) -> str:
        name = f"spotckpt-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def start_moto() -> S3Server:
    port = free_port()
    log = open(os.devnull, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start within 30 s")
    return S3Server(endpoint, "testing", "testing-secret-key", proc)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    ep = os.environ.get("SPOTCKPT_TEST_S3_ENDPOINT")
    if ep:
        yield S3Server(ep, os.environ.get("AWS_ACCESS_KEY_ID", "minioadmin"),
                       os.environ.get("AWS_SECRET_ACCESS_KEY", "minioadmin"), None, "external")
        return
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


class _RGW:
    """The session's RGW: brought up on first use, the outcome kept for the summary line."""
    result: dict | None = None
    error: str | None = None


@pytest.fixture(scope="session")
def rgw_server() -> Iterator[S3Server]:
    sys.path.insert(0, str(REPO / "tests" / "servers"))
    import rgw

    if not RGW_ENABLED:
        _RGW.error = "SPOTCKPT_TEST_RGW=0"
    else:
        try:
            _RGW.result = rgw.up(lease=os.getpid())
        except (rgw.RGWError, OSError, subprocess.SubprocessError) as e:
            _RGW.error = str(e).splitlines()[0] if str(e) else type(e).__name__
    if _RGW.error is not None:
        msg = f"RGW leg not run: {_RGW.error}"
        if RGW_REQUIRED and RGW_ENABLED:  # SPOTCKPT_TEST_RGW=0 is a choice, not a failure
            pytest.fail(msg + " (SPOTCKPT_REQUIRE_RGW=1)", pytrace=False)
        pytest.skip(msg)
    env = _RGW.result["env"]
    try:
        yield S3Server(env["AWS_ENDPOINT_URL_S3"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                       None, "rgw")
    finally:
        rgw.release(os.getpid())


@pytest.fixture(scope="module")
def s3_backend(request: pytest.FixtureRequest) -> str:
    """``moto`` (default) or ``rgw``: which server ``s3_server`` is (module scope, so that
    module-scoped fixtures may take ``s3_server`` as they did when it was moto's alone)."""
    return getattr(request, "param", "moto")


@pytest.fixture(scope="module")
def s3_server(s3_backend: str, request: pytest.FixtureRequest) -> S3Server:
    return request.getfixturevalue("rgw_server" if s3_backend == "rgw" else "moto_server")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    both = metafunc.module.__name__.rpartition(".")[2] in RGW_MODULES
    if "remote_url" in metafunc.fixturenames:
        metafunc.parametrize("remote_url", ["file", "s3", "rgw"] if both else ["file", "s3"], indirect=True)
    elif both and "s3_server" in metafunc.fixturenames:
        metafunc.parametrize("s3_backend", ["moto", "rgw"], indirect=True, scope="module")


_FIGURES: list[str] = []


@pytest.fixture
def figure(record_property) -> Callable[[str], None]:
    """``figure(line)``: a measured figure (``[chaos] ...``, ``[faults] ...``) printed in the
    run's summary. It travels in the test report, so it reaches the summary from a pytest-xdist
    worker too (a print would stay in the worker)."""
    return lambda line: record_property("figure", line.strip())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _FIGURES.extend(v for k, v in report.user_properties if k == "figure")


def _rgw_line() -> str | None:
    if _RGW.result is not None:
        r = _RGW.result
        how = f"up in {r['up_s']:.1f} s" if r["started"] else f"reused a running instance ({r['up_s']:.1f} s)"
        inst = f" (packages installed in {r['install_s']:.0f} s)" if r["install_s"] is not None else ""
        return f"[rgw] {how}{inst}: {r['env']['AWS_ENDPOINT_URL_S3']}"
    if _RGW.error is not None:
        return f"[rgw] RGW LEG NOT RUN ({'failed' if RGW_REQUIRED and RGW_ENABLED else 'skipped'}): {_RGW.error}"
    return None


def _server_lines() -> list[str]:
    from docker_fixtures import docker_line

    return [x for x in (_rgw_line(), docker_line()) if x is not None]


_WORKER_LINES: list[str] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker: hand the RGW and Docker lines to the controller, which prints
    the summary."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None and _server_lines():
        out["server_lines"] = _server_lines()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # pytest-xdist's hook, on the controller
    for line in getattr(node, "workeroutput", {}).get("server_lines", []):
        if line not in _WORKER_LINES:
            _WORKER_LINES.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures the tests measured, and one line on the RGW leg and one on the Docker leg
    whenever a test asked for them (from this process, or from each pytest-xdist worker that
    brought them up or reused them)."""
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
    for line in [*_server_lines(), *_WORKER_LINES]:
        bad = "NOT RUN" in line or "NOT CLEAN" in line
        terminalreporter.write_line(line, red=bad, bold=bad)


def point_at(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process (and subprocesses given os.environ) at ``server``."""
    env = server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process (and subprocesses given os.environ) at the S3 test server."""
    return point_at(s3_server, monkeypatch)


@pytest.fixture
def s3_remote(s3_server: S3Server, s3_env: dict[str, str]) -> str:
    """A fresh bucket on the S3 test server, as an ``s3://bucket/prefix/`` URL."""
    return f"s3://{s3_server.new_bucket()}/run/"


@pytest.fixture
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on both backends (one behaviour contract): ``file``, ``s3`` (moto) and,
    in ``RGW_MODULES``, ``rgw`` (parametrized by pytest_generate_tests)."""
    if request.param == "file":
        return f"file://{tmp_path / 'remote'}/"
    if request.param == "rgw":
        server = request.getfixturevalue("rgw_server")
        point_at(server, request.getfixturevalue("monkeypatch"))
        return f"s3://{server.new_bucket()}/run/"
    return request.getfixturevalue("s3_remote")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("SPOTCKPT_") and k != "SPOTCKPT_TEST_S3_ENDPOINT" and not k.startswith("SPOTCKPT_RGW_"):
            monkeypatch.delenv(k)


def run_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess: this one, plus ``extra``."""
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def remote_files(remote: str) -> dict:
    """The newest committed file set of the watched dir on ``remote``: path -> Entry."""
    from spotckpt._remote._store import RemoteStore
    from spotckpt._watch._fileset import newest_set

    fs = newest_set(RemoteStore(remote))
    return {} if fs is None else dict(fs.entries)
