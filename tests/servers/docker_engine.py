"""A private Docker engine for tests: Debian's ``docker.io``, its own dirs, the host's network untouched.

One ``dockerd`` (engine 20.10 from Debian 12's ``docker.io``, installed with apt-get together
with ``debootstrap`` when missing; root only) with its own ``--data-root``, ``--exec-root``,
socket, pidfile and config file, ``--bridge=none --iptables=false --ip-forward=false
--ip-masq=false`` and its own cgroup parent: it touches neither the host's networking nor a
system-wide engine's data. Containers run with ``--network=host`` (they reach S3 servers on
the host's loopback) or ``--network=none``. No registry is needed: the base image is made
locally (``docker_image.py``: debootstrap + ``docker import``, cached as a tarball). Usable by
hand through ``tests/servers/docker.sh`` (``docker_cli.py``) and from Python (``tests/docker_fixtures.py``)::

    tests/servers/docker.sh up       # install, start (or reuse) the engine, base image; prints the socket
    . /var/tmp/spotckpt-docker/run/env && $DOCKER ps
    tests/servers/docker.sh image    # build docker/Dockerfile from this checkout with no network
    tests/servers/docker.sh status
    tests/servers/docker.sh down     # stop it, unmount, check the host is as it was (--purge: the caches too)

Dirs (``SPOTCKPT_DOCKER_DIR``, default /var/tmp/spotckpt-docker): ``engine/`` (the data root:
images and build cache, kept between runs), ``cache/`` (base image tarball, wheelhouses),
``run/`` (exec root, socket, pidfile, logs, leases; removed by ``down``).

Sharing (as ``rgw.py``): ``up``/``down`` take a lock; a caller passing ``lease=PID`` is a
tenant, and :func:`release` stops the engine when no live tenant is left and no one started
or adopted it by hand. Tear-down removes every container, stops dockerd by its pidfile,
unmounts what is left under the dirs (``<exec-root>/netns/default``), removes the cgroups and
the host dirs dockerd made (``/run/docker``, the shim sockets' ``/run/containerd/s``) and
checks: no process of the engine, no mount, ``ip_forward``, firewall rules and network
devices as before. Python standard library only: runs under any python3.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PACKAGES = ["docker.io", "debootstrap"]
DOCKERD, CLI = "/usr/sbin/dockerd", "/usr/bin/docker"  # the package's own CLI (a preinstalled 28.x has no buildx)
BINARIES = [DOCKERD, CLI, "/usr/sbin/debootstrap", "/usr/bin/containerd", "/usr/sbin/runc"]
CGROUP_PARENT = "spotckpt-docker"
# dirs outside ours that dockerd/containerd make when missing (paths built into them)
HOST_DIRS = ["/run/docker", "/run/docker/plugins", "/run/containerd", "/run/containerd/s"]
SYSTEM_CONTAINERD = "/run/containerd/containerd.sock"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


class DockerError(RuntimeError):
    """The engine could not be installed, started or stopped cleanly (one line says why)."""


def root() -> Path:
    return Path(os.environ.get("SPOTCKPT_DOCKER_DIR") or "/var/tmp/spotckpt-docker")


def run_dir() -> Path:
    return root() / "run"


def socket_path() -> Path:
    return run_dir() / "docker.sock"


def env_vars() -> dict[str, str]:
    """What a client sets to use this engine (also written to ``run/env``): the socket, a CLI
    config dir of its own (never ``~/.docker``) and the classic builder (no buildx here)."""
    return {"DOCKER_HOST": f"unix://{socket_path()}", "DOCKER_CONFIG": str(run_dir() / "cli"),
            "DOCKER_BUILDKIT": "0", "DOCKER": CLI}


def cli(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the package's docker CLI against this engine; output captured as text."""
    env = dict(os.environ, **env_vars())
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    r = subprocess.run([CLI, *args], env=env, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        err = (r.stderr or r.stdout or "").strip().splitlines()
        raise DockerError(f"docker {' '.join(args[:2])} failed ({r.returncode}): {err[-1] if err else ''}")
    return r


# -- install ---------------------------------------------------------------------------------
def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not os.access(b, os.X_OK)]


def install() -> float | None:
    """apt-get install docker.io and debootstrap when a binary is missing; the seconds it took
    (None: nothing to install). Root only."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        raise DockerError(f"not root: a private Docker engine needs root ({', '.join(missing_binaries())} missing)")
    if shutil.which("apt-get") is None:
        raise DockerError("docker.io missing and no apt-get (a Debian 12 host is needed)")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0 or missing_binaries():
        tail = r.stdout.strip().splitlines()[-1:] or [""]
        raise DockerError(f"apt-get install {' '.join(PACKAGES)} failed: {tail[0]}")
    return time.monotonic() - t0


# -- the host's state, before and after --------------------------------------------------------
def _firewall() -> str:
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            r = subprocess.run([tool], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
            out += [x for x in r.stdout.splitlines() if not x.startswith("#")]  # comments carry a date
    return "\n".join(out)


def host_state() -> dict:
    """What the engine must leave as it found it: forwarding, firewall rules, network devices."""
    return {"ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            "firewall": _firewall(), "netdevs": sorted(os.listdir("/sys/class/net"))}


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    p = str(path).rstrip("/")
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")  # \040 for a space
        if mp == p or mp.startswith(p + "/"):
            out.append(mp)
    return sorted(set(out), key=lambda m: -m.count("/"))


def unmount_under(path: Path) -> None:
    for mp in mounts_under(path):
        if subprocess.run(["umount", mp], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


ENGINE_COMMS = {"dockerd", "containerd", "containerd-shim"}  # /proc/PID/comm (15 bytes: every shim)


def engine_pids() -> list[int]:
    """Live daemons of this engine: dockerd, containerd and the shims, whose command lines
    name our dirs (never another engine's, nor a process that merely reads our files);
    zombies (waiting for a reaper) are gone for this purpose."""
    needle = str(root()).encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() in ENGINE_COMMS and needle in (d / "cmdline").read_bytes() \
                    and "\nState:\tZ" not in (d / "status").read_text():
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _dockerd_pid() -> int | None:
    try:
        pid = int((run_dir() / "dockerd.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(root() / "engine").encode() in cmdline else None  # never a recycled pid


def healthy() -> bool:
    if _dockerd_pid() is None or not socket_path().exists():
        return False
    try:
        return cli("version", "--format", "{{.Server.Version}}", timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# -- start and stop --------------------------------------------------------------------------
def _start() -> None:
    d = run_dir()
    if len(str(socket_path())) > 90:
        raise DockerError(f"SPOTCKPT_DOCKER_DIR={root()} is too long for a unix socket path")
    if os.path.exists(SYSTEM_CONTAINERD):
        # dockerd 20.10 uses a containerd found there instead of starting its own
        raise DockerError(f"a system-wide containerd serves {SYSTEM_CONTAINERD}: a private engine would "
                          "share it; not starting one")
    shutil.rmtree(d, ignore_errors=True)
    (d / "leases").mkdir(parents=True)
    (d / "cli").mkdir()
    state = host_state()
    state["host_dirs_made"] = [h for h in HOST_DIRS if not os.path.exists(h)]
    (d / "host.json").write_text(json.dumps(state))
    # trust key out of /etc/docker; bridge, iptables, forwarding and masquerading off
    (d / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(d / "key.json")}))
    cmd = [DOCKERD, "--data-root", str(root() / "engine"), "--exec-root", str(d / "exec"),
           "-H", f"unix://{socket_path()}", "--pidfile", str(d / "dockerd.pid"),
           "--config-file", str(d / "daemon.json"), "--bridge=none", "--iptables=false",
           "--ip-forward=false", "--ip-masq=false", "--storage-driver=overlay2",
           f"--cgroup-parent={CGROUP_PARENT}"]
    with open(d / "dockerd.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.05
    while not healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            lines = (d / "dockerd.log").read_text(errors="replace").strip().splitlines()
            why = f"exited with status {proc.returncode}" if proc.poll() is not None else "not ready in time"
            raise DockerError(f"dockerd {why}: {lines[-1][-300:] if lines else ''} (log: {d / 'dockerd.log'})")
        time.sleep(delay)  # a daemon with no readiness event: poll its socket
        delay = min(delay * 1.5, 0.5)
    (d / "env").write_text("".join(f"export {k}={v}\n" for k, v in env_vars().items()))


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if p in engine_pids()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _stop() -> list[str]:
    """Stop the engine and clean up after it; returns what is not as it was (empty: clean)."""
    d = run_dir()
    pid = _dockerd_pid()
    if pid is not None:
        try:
            ids = cli("ps", "-aq", timeout=60, check=False).stdout.split()
            if ids:
                cli("rm", "-f", *ids, timeout=STOP_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            pass
        os.kill(pid, signal.SIGTERM)  # dockerd stops its containerd and unmounts its layers
        _wait_gone([pid], STOP_TIMEOUT)
    leftovers = engine_pids()
    for p in leftovers:  # a dockerd that did not stop, a containerd or shim it left behind
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_gone(leftovers, 10)
    unmount_under(root())
    for cg in sorted(Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}")):
        for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir(sub)
        _rmdir(cg)
    try:
        state = json.loads((d / "host.json").read_text())
    except (OSError, ValueError):
        state = None
    for h in reversed((state or {}).get("host_dirs_made", [])):
        _rmdir(Path(h))
    problems = []
    if engine_pids():
        problems.append(f"engine processes still running: {engine_pids()}")
    if mounts_under(root()):
        problems.append(f"mounts left: {mounts_under(root())}")
    if state is not None:
        now = host_state()
        for k in ("ip_forward", "firewall", "netdevs"):
            if now[k] != state[k]:
                problems.append(f"host {k} changed: {state[k]!r} -> {now[k]!r}")
        left = [h for h in state["host_dirs_made"] if os.path.exists(h)]
        if left:
            problems.append(f"host dirs left: {left}")
    if not mounts_under(d):
        shutil.rmtree(d, ignore_errors=True)
    return problems


def _rmdir(p: Path) -> None:
    try:
        p.rmdir()
    except OSError:
        pass  # not empty (someone else's) or gone


# -- API -------------------------------------------------------------------------------------
@contextmanager
def locked(name: str = "engine") -> Iterator[None]:
    root().mkdir(parents=True, exist_ok=True)
    with open(root() / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _live_leases() -> list[int]:
    out = []
    for f in (run_dir() / "leases").glob("*"):
        try:
            pid = int(f.name)
            os.kill(pid, 0)
            out.append(pid)
        except ValueError:
            continue
        except ProcessLookupError:
            f.unlink(missing_ok=True)
    return out


def tags_in_use() -> set[str]:
    """Image tags the live tenants wrote into their leases (:func:`hold_tag`)."""
    out: set[str] = set()
    for pid in _live_leases():
        try:
            out |= set((run_dir() / "leases" / str(pid)).read_text().split())
        except OSError:
            continue
    return out


def hold_tag(lease: int, tag: str) -> None:
    """Record that tenant ``lease`` runs ``tag``: no other session's clean-up removes it."""
    f = run_dir() / "leases" / str(lease)
    if f.exists() and tag not in f.read_text().split():
        with open(f, "a") as out:
            out.write(tag + "\n")


def up(lease: int | None = None, base: bool = True) -> dict:
    """Start the engine (installing the packages if needed) or reuse a healthy one, and make
    sure the base image is there.

    Returns ``{"env", "started", "up_s", "install_s", "base"}`` (``base``: see
    ``docker_image.ensure_base``). ``lease``: the pid of a tenant (see :func:`release`); None:
    a hand start, which stays up until :func:`down`.
    """
    if os.geteuid() != 0:
        raise DockerError("not root: a private Docker engine needs root")
    with locked():
        install_s = install()
        t0 = time.monotonic()
        started = not healthy()
        if started:
            problems = _stop()  # a stale run dir of a killed run: its processes, mounts, dirs
            if problems:
                raise DockerError("a previous engine left the host changed: " + "; ".join(problems))
            try:
                _start()
            except BaseException:
                _stop()
                raise
            if lease is not None:
                (run_dir() / "started-by-lease").touch()
        if lease is None:
            (run_dir() / "started-by-lease").unlink(missing_ok=True)  # adopted by hand: stays up
        else:
            (run_dir() / "leases" / str(lease)).touch()
        up_s = time.monotonic() - t0
    info = None
    if base:
        import docker_image

        info = docker_image.ensure_base()
    return {"env": env_vars(), "started": started, "up_s": up_s, "install_s": install_s, "base": info}


def release(lease: int) -> list[str] | None:
    """Drop ``lease``; stop the engine if no live tenant remains and a tenant started it.
    Returns None if it stays up, else the problems its tear-down found (empty: clean)."""
    with locked():
        (run_dir() / "leases" / str(lease)).unlink(missing_ok=True)
        if not (run_dir() / "started-by-lease").exists() or _live_leases():
            return None
        return _stop()


def down(purge: bool = False) -> list[str]:
    """Stop the engine, clean up, check the host; ``purge``: remove the caches too."""
    with locked():
        problems = _stop()
        if purge and not problems:
            for sub in ("engine", "cache"):
                shutil.rmtree(root() / sub, ignore_errors=True)
        return problems
