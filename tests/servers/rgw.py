"""A real S3 server for tests and benchmarks: Ceph's RADOS Gateway on 127.0.0.1.

One ceph-mon, one OSD (bluestore on a sparse file) and radosgw, from Debian 12's packages
(installed with apt-get when missing; root only), all under one run dir. Usable by hand
through ``tests/servers/rgw.sh`` and from Python (``tests/conftest.py``)::

    tests/servers/rgw.sh up      # start (or reuse a healthy instance), print endpoint + keys
    . /tmp/spotckpt-rgw/env      # AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...
    tests/servers/rgw.sh status
    tests/servers/rgw.sh down    # stop only the daemons in the run dir's pid files, remove its data

Settings (each measured, see docs/design.md "RGW in the test suite"): no cephx
(``auth_* = none`` with ``ms_mon_client_mode = crc``, else radosgw waits 300 s on
"get_initial_auth_request returned -13"); ``paxos_propose_interval = 0.05`` (else each pool
creation takes 1 s); beast with ``tcp_nodelay=1`` (else a small GET takes 44 ms); a short
garbage-collection period (deleted objects' space comes back within seconds); fixed ports
below the ephemeral range; no ceph-mgr (not needed for I/O).

Environment: ``SPOTCKPT_RGW_DIR`` (run dir, default /tmp/spotckpt-rgw), ``SPOTCKPT_RGW_PORT``
(the S3 port, default 17480; the monitor listens on port+1 and the OSD on port+2..port+30).

Sharing: ``up``/``down`` take a lock, so concurrent callers start one instance. A caller that
passes ``lease=PID`` (the test suite) is a tenant: :func:`release` stops the instance only when
no other live tenant holds it and no one started or adopted it by hand (plain ``up``).
Python standard library only: runs under any python3.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PACKAGES = ["radosgw", "ceph-mon", "ceph-osd"]
BINARIES = ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool"]
DAEMONS = ["mon.a", "osd.0", "client.rgw"]
ACCESS_KEY, SECRET_KEY = "spotckpt-rgw-test", "spotckpt-rgw-test-secret-key"
UID = "spotckpt"
START_TIMEOUT = 120.0


class RGWError(RuntimeError):
    """RGW could not be installed or started (the message says why, in one line)."""


def run_dir() -> Path:
    return Path(os.environ.get("SPOTCKPT_RGW_DIR") or "/tmp/spotckpt-rgw")


def base_port() -> int:
    port = int(os.environ.get("SPOTCKPT_RGW_PORT") or 17480)
    if not 1024 < port < 32768 - 31:
        raise RGWError(f"SPOTCKPT_RGW_PORT={port}: choose a port in 1025..32736 (below the ephemeral range)")
    return port


def endpoint() -> str:
    return f"http://127.0.0.1:{base_port()}"


def env_vars() -> dict[str, str]:
    """What a client sets to use this server (also written to ``<run dir>/env``)."""
    return {"AWS_ENDPOINT_URL_S3": endpoint(), "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
            "SPOTCKPT_RGW_ENDPOINT": endpoint()}


def _conf(d: Path, fsid: str) -> str:
    p = base_port()
    return f"""[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{p + 1}]
mon_initial_members = a
public_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_port_min = {p + 2}
ms_bind_port_max = {p + 30}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
paxos_propose_interval = 0.05
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
run_dir = {d}/run
pid_file = {d}/run/$name.pid
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
mon_data = {d}/mon
osd_data = {d}/osd
keyring = /dev/null
[osd]
osd_objectstore = bluestore
bluestore_block_path = {d}/osd/block.img
bluestore_block_size = 21474836480
bluestore_block_create = true
bluestore_fsck_on_mkfs = false
osd_memory_target = 939524096
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:{p} tcp_nodelay=1
rgw_data = {d}/rgw
rgw_gc_obj_min_wait = 10
rgw_gc_processor_period = 10
rgw_gc_processor_max_time = 10
rgw_enable_usage_log = false
rgw_dynamic_resharding = false
"""


# -- install ---------------------------------------------------------------------------------
def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def install() -> float | None:
    """Install the Debian packages when a binary is missing; returns the seconds it took (None:
    nothing to install). Root and apt-get only; raises RGWError otherwise."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        raise RGWError(f"Ceph packages missing ({', '.join(missing_binaries())}) and not root: "
                       f"apt-get install {' '.join(PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise RGWError("Ceph packages missing and no apt-get (a Debian 12 host is needed)")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0 or missing_binaries():
        tail = r.stdout.strip().splitlines()[-1:] or [""]
        raise RGWError(f"apt-get install {' '.join(PACKAGES)} failed: {tail[0]}")
    return time.monotonic() - t0


# -- processes -------------------------------------------------------------------------------
def _pid(d: Path, name: str) -> int | None:
    """The pid in ``name``'s pid file if that process is alive and is ours (its command line
    names this run dir's conf: a recycled pid is never signalled)."""
    try:
        pid = int((d / "run" / f"{name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(d / "ceph.conf").encode() in cmdline else None


def _ceph(d: Path, *args: str, timeout: float = 60) -> str:
    r = subprocess.run([*args[:1], "-c", str(d / "ceph.conf"), *args[1:]], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RGWError(f"{' '.join(args[:3])} failed ({r.returncode}): {r.stdout.strip()[-300:]}")
    return r.stdout


def _http_ok() -> bool:
    try:
        urllib.request.urlopen(endpoint() + "/", timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True  # any S3 answer (403 for anonymous) means the frontend serves requests
    except OSError:
        return False


def healthy(d: Path | None = None) -> bool:
    d = d or run_dir()
    return (all(_pid(d, n) for n in DAEMONS) and (d / "env").exists() and _http_ok())


def _wait(what: str, check, deadline: float, d: Path) -> None:
    delay = 0.05
    while not check():
        if time.monotonic() > deadline:
            raise RGWError(f"{what} not ready within {START_TIMEOUT:.0f} s (logs: {d}/log)")
        time.sleep(delay)  # polling a daemon that offers no readiness event
        delay = min(delay * 1.5, 0.5)


def _osd_up(d: Path) -> bool:
    try:
        out = _ceph(d, "ceph", "osd", "stat", "-f", "json", timeout=30)
    except (RGWError, subprocess.TimeoutExpired):
        return False
    return json.loads(out).get("num_up_osds", 0) >= 1


def _stop(d: Path) -> None:
    """SIGKILL the daemons in ``d``'s pid files (ours only) and wait until they are gone: their
    data is removed right after, so a clean shutdown (seconds for an OSD) buys nothing."""
    pids = [p for p in (_pid(d, n) for n in DAEMONS) if p]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in pids:
        while Path(f"/proc/{p}").exists() and b"zombie" not in _status(p):
            time.sleep(0.02)


def _status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return b"zombie"


def _start(d: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    if d.exists():
        shutil.rmtree(d)
    for sub in ("run", "log", "mon", "osd", "rgw", "leases"):
        (d / sub).mkdir(parents=True)
    fsid = str(uuid.uuid4())
    conf = d / "ceph.conf"
    conf.write_text(_conf(d, fsid))
    c = str(conf)
    _ceph(d, "monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{base_port() + 1}]",
          str(d / "monmap"))
    _ceph(d, "ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
    _ceph(d, "ceph-mon", "-i", "a")  # daemonizes once listening
    osd_uuid = str(uuid.uuid4())
    osd_id = _ceph(d, "ceph", "osd", "new", osd_uuid).strip()
    if osd_id != "0":
        raise RGWError(f"ceph osd new gave id {osd_id!r}, expected 0")
    _ceph(d, "ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=120)
    _ceph(d, "ceph-osd", "-i", "0")
    _wait("the OSD", lambda: _osd_up(d), deadline, d)
    _ceph(d, "radosgw", "-n", "client.rgw")
    _wait("radosgw", _http_ok, deadline, d)
    r = subprocess.run(["radosgw-admin", "-c", c, "-n", "client.rgw", "user", "create", f"--uid={UID}",
                        "--display-name=spotckpt tests", f"--access-key={ACCESS_KEY}",
                        f"--secret-key={SECRET_KEY}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise RGWError(f"radosgw-admin user create failed: {r.stdout.strip()[-300:]}")
    (d / "env").write_text("".join(f"export {k}={v}\n" for k, v in env_vars().items()))


# -- API -------------------------------------------------------------------------------------
@contextmanager
def _locked(d: Path) -> Iterator[None]:
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(str(d) + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _live_leases(d: Path) -> list[int]:
    out = []
    for f in (d / "leases").glob("*"):
        try:
            pid = int(f.name)
            os.kill(pid, 0)
            out.append(pid)
        except ValueError:
            continue
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except PermissionError:
            out.append(pid)
    return out


def up(lease: int | None = None) -> dict:
    """Start RGW (installing the packages if needed) or reuse a healthy instance.

    Returns ``{"env": {...}, "started": bool, "up_s": float, "install_s": float | None}``.
    ``lease``: the pid of a tenant (see :func:`release`); None: a hand start, which stays up
    until :func:`down`.
    """
    d = run_dir()
    install_s = install()
    t0 = time.monotonic()
    with _locked(d):
        started = not healthy(d)
        if started:
            _stop(d)  # a stale run dir from a killed run: its daemons (if any), then its data
            try:
                _start(d)
            except BaseException:
                _stop(d)
                raise
            if lease is not None:
                (d / "started-by-lease").touch()
        if lease is None:
            (d / "started-by-lease").unlink(missing_ok=True)  # adopted by hand: stays up
        else:
            (d / "leases" / str(lease)).touch()
    return {"env": env_vars(), "started": started, "up_s": time.monotonic() - t0, "install_s": install_s}


def release(lease: int) -> bool:
    """Drop ``lease``; stop and remove the instance if no live tenant remains and it was started
    by a tenant (not by hand). Returns True if it stopped it."""
    d = run_dir()
    with _locked(d):
        (d / "leases" / str(lease)).unlink(missing_ok=True)
        if not (d / "started-by-lease").exists() or _live_leases(d):
            return False
        _down(d)
        return True


def _down(d: Path) -> None:
    _stop(d)
    if d.exists():
        shutil.rmtree(d)


def down() -> None:
    """Stop the daemons in the run dir's pid files (ours only) and remove the run dir."""
    d = run_dir()
    with _locked(d):
        _down(d)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    try:
        if cmd == "up":
            lease = int(argv[2]) if len(argv) > 2 and argv[1] == "--lease" else None
            r = up(lease)
            inst = f" (packages installed in {r['install_s']:.0f} s)" if r["install_s"] is not None else ""
            how = "up" if r["started"] else "already up, reused"
            print(f"[rgw] {how} in {r['up_s']:.1f} s{inst}: {endpoint()} (env file: {run_dir() / 'env'})",
                  file=sys.stderr)
            sys.stdout.write((run_dir() / "env").read_text())
        elif cmd == "down":
            down()
        elif cmd == "release" and len(argv) > 1:
            release(int(argv[1]))
        elif cmd == "status":
            ok = healthy()
            print(f"[rgw] {'up: ' + endpoint() if ok else 'down'} ({run_dir()})")
            return 0 if ok else 1
        else:
            print("usage: rgw.sh up [--lease PID] | down | release PID | status", file=sys.stderr)
            return 2
    except RGWError as e:
        print(f"[rgw] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
