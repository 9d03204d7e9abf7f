"""Images for the private engine (``docker_engine.py``), made with no registry and no network in the build.

- **Base image** (:func:`ensure_base`): ``debootstrap --variant=minbase`` of the host's own
  suite from the mirror the host's apt uses, with ``python3`` and ``python3-venv``, a venv at
  ``/opt/venv`` first on PATH (``python`` and ``pip`` as in ``python:3.11-slim``), then
  ``tar | docker import``. The tarball is cached in ``cache/``, so the engine's data root can
  be wiped and the image comes back in seconds.
- **Wheelhouse** (:func:`wheelhouse`): ``pip wheel`` on the host of torch (the Dockerfile's
  ``TORCH_VERSION``), numpy, setuptools and spotckpt's dependencies and extras, as
  ``pyproject.toml`` lists them; cached under a key of those requirements and the Python
  version, which must be the base image's (checked).
- **The spotckpt image** (:func:`build`): ``docker/Dockerfile`` unchanged, built from this
  checkout (tracked and untracked files, as ``git`` lists them, plus the wheelhouse as
  ``wheelhouse/``) with ``--network=none``, ``BASE_IMAGE`` and ``WHEELHOUSE``: a build that
  needed an index would fail. Tagged by a hash of everything that went in; reused when that
  tag exists; the older tags beyond the newest few are removed.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import docker_engine as eng

RECIPE = "minbase+python3+venv/1"  # bump when the base recipe changes
BASE_PACKAGES = ["python3", "python3-venv"]
KEEP_TAGS = 3
KEEP_HOURS = 3  # a tag younger than this is kept: a concurrent session may be about to run it
VENV_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache() -> Path:
    d = eng.root() / "cache"
    d.mkdir(parents=True, exist_ok=True)
    return d


class BuildError(eng.DockerError):
    """``docker build`` of docker/Dockerfile failed: the code under test, not the machine."""


def sweep() -> None:
    """Remove what a killed run left in ``cache/``: a build context, a debootstrap root, a
    wheelhouse or tarball in the making, of a process that is gone."""
    for p in cache().iterdir():
        m = re.search(r"(?:^context|^rootfs\.tmp|\.tmp)-(\d+)$", p.name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        eng.unmount_under(p)
        if p.is_dir() and not eng.mounts_under(p):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file():
            p.unlink()


def _key(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:12]


# -- base image ------------------------------------------------------------------------------
def suite_and_mirror() -> tuple[str, str]:
    """The host's release codename and the Debian mirror its apt already uses."""
    osr = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    suite = osr.get("VERSION_CODENAME", "bookworm").strip('"')
    mirror = "http://deb.debian.org/debian"
    src = Path("/etc/apt/sources.list.d/debian.sources")
    if src.exists():  # deb822 stanzas: the first one of type deb that has our suite
        for stanza in src.read_text().split("\n\n"):
            f = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in f.get("Types", "").split() and suite in f.get("Suites", "").split() and f.get("URIs"):
                return suite, f["URIs"].split()[0]
    lst = Path("/etc/apt/sources.list")
    if lst.exists():
        m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{suite}\s", lst.read_text(), re.M)
        if m:
            mirror = m.group(1)
    return suite, mirror


def base_tag() -> str:
    suite, mirror = suite_and_mirror()
    return f"spotckpt-base:{suite}-{_key(RECIPE, suite, mirror, *BASE_PACKAGES)}"


def image_exists(tag: str) -> bool:
    return eng.cli("image", "inspect", tag, check=False, timeout=60).returncode == 0


def _debootstrap(tar: Path) -> None:
    suite, mirror = suite_and_mirror()
    rootfs = cache() / f"rootfs.tmp-{os.getpid()}"
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                            suite, str(rootfs), mirror], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=900)
        if r.returncode != 0:
            lines = r.stdout.strip().splitlines()
            raise eng.DockerError(f"debootstrap {suite} from {mirror} failed: {lines[-1] if lines else ''}")
        r = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", "/opt/venv"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        if r.returncode != 0:
            raise eng.DockerError(f"python3 -m venv in the base image failed: {r.stdout.strip()[-300:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tmp = tar.with_name(f"{tar.name}.tmp-{os.getpid()}")
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*",
                        "--exclude=./sys/*", "-cf", str(tmp), "."], check=True, timeout=600)
        tmp.rename(tar)
    finally:
        eng.unmount_under(rootfs)  # debootstrap mounts /proc and /sys inside while it runs
        if not eng.mounts_under(rootfs):
            shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base() -> dict:
    """The base image in the engine: present, imported from the cached tarball, or made with
    debootstrap first. Returns ``{"tag", "how", "seconds"}``."""
    tag = base_tag()
    t0 = time.monotonic()
    with eng.locked("base"):
        sweep()
        if image_exists(tag):
            return {"tag": tag, "how": "present", "seconds": time.monotonic() - t0}
        tar = cache() / f"base-{tag.split(':')[1]}.tar"
        how = "imported from the cached tarball"
        if not tar.exists():
            _debootstrap(tar)
            how = "debootstrap + import"
        eng.cli("import", "--change", f"ENV PATH={VENV_PATH}", "--change", "ENV LANG=C.UTF-8",
                "--change", 'CMD ["python"]', str(tar), tag, timeout=600)
    return {"tag": tag, "how": how, "seconds": time.monotonic() - t0}


# -- wheelhouse ------------------------------------------------------------------------------
def requirements(repo: Path, extras: str) -> list[str]:
    """What the Dockerfile installs, as pip requirements: torch at the Dockerfile's version,
    numpy, setuptools for the build, spotckpt's dependencies and those of ``extras``."""
    import tomllib

    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", (repo / "docker" / "Dockerfile").read_text(), re.M).group(1)
    reqs = [f"torch=={torch}", "numpy", "setuptools>=77", *project["dependencies"]]
    for e in filter(None, extras.split(",")):
        reqs += project["optional-dependencies"][e]
    return reqs


def image_python(tag: str) -> str:
    return eng.cli("run", "--rm", "--network=none", tag, "python", "-c",
                   "import sys; print('%d.%d' % sys.version_info[:2])", timeout=120).stdout.strip()


def wheelhouse(repo: Path, extras: str, base: str) -> dict:
    """Wheels for everything the image installs, made on the host by this Python's pip.
    Returns ``{"path", "how", "seconds"}``."""
    t0 = time.monotonic()
    host_py = "%d.%d" % sys.version_info[:2]
    img_py = image_python(base)
    if img_py != host_py:
        raise eng.DockerError(f"the base image has Python {img_py}, this pytest runs {host_py}: "
                              "the wheelhouse would not fit (run the suite with the base image's Python)")
    reqs = requirements(repo, extras)
    path = cache() / f"wheelhouse-py{host_py}-{_key(*reqs)}"
    with eng.locked("wheelhouse"):
        if path.is_dir():
            return {"path": path, "how": "cached", "seconds": time.monotonic() - t0}
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                            "-w", str(tmp), *reqs], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=1200)
        if r.returncode != 0:
            errs = [x for x in r.stdout.splitlines() if "ERROR" in x] or r.stdout.strip().splitlines()[-1:]
            shutil.rmtree(tmp, ignore_errors=True)
            raise eng.DockerError(f"pip wheel for the wheelhouse failed: {errs[0] if errs else r.returncode}")
        tmp.rename(path)
    return {"path": path, "how": "pip wheel", "seconds": time.monotonic() - t0}


# -- the spotckpt image ----------------------------------------------------------------------
def _checkout_files(repo: Path) -> list[str]:
    r = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60)
    if r.returncode == 0:
        return sorted(f for f in r.stdout.decode().split("\0") if f and (repo / f).is_file())
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(repo).parts))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def build(repo: Path, extras: str = "torch", lease: int | None = None) -> dict:
    """Build docker/Dockerfile from ``repo`` with no network; ``lease``: the tenant that will
    run the image (its tag is then kept by other sessions' clean-up). Returns ``{"tag",
    "how", "seconds", "base", "wheelhouse", "context_bytes", "wheelhouse_bytes", "log"}``."""
    t0 = time.monotonic()
    base = ensure_base()
    wh = wheelhouse(repo, extras, base["tag"])
    files = _checkout_files(repo)
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + (repo / f).read_bytes() + b"\0")
    tag = f"spotckpt-test:{_key(h.hexdigest(), base['tag'], wh['path'].name, extras)}"
    wh_bytes = sum(p.stat().st_size for p in wh["path"].iterdir())
    out = {"tag": tag, "base": base, "wheelhouse": wh, "wheelhouse_bytes": wh_bytes, "context_bytes": None,
           "log": ""}
    with eng.locked("build"):
        if lease is not None:
            eng.hold_tag(lease, tag)  # before anything else can prune: under the build lock
        if image_exists(tag):
            return {**out, "how": "present", "seconds": time.monotonic() - t0}
        ctx = cache() / f"context-{os.getpid()}"
        shutil.rmtree(ctx, ignore_errors=True)
        try:
            for f in files:
                _link(repo / f, ctx / f)
            for w in wh["path"].iterdir():
                _link(w, ctx / "wheelhouse" / w.name)
            r = eng.cli("build", "--network=none", "-f", "docker/Dockerfile", "--build-arg",
                        f"BASE_IMAGE={base['tag']}", "--build-arg", "WHEELHOUSE=wheelhouse", "--build-arg",
                        f"EXTRAS={extras}", "-t", tag, str(ctx), timeout=1800, check=False,
                        stderr=subprocess.STDOUT)
        finally:
            shutil.rmtree(ctx, ignore_errors=True)
        if r.returncode != 0:
            tail = [x for x in r.stdout.strip().splitlines() if x.strip()][-3:]
            raise BuildError(f"docker build of docker/Dockerfile failed: {' | '.join(tail)}")
        m = re.search(r"Sending build context to Docker daemon\s+([\d.]+)([kMG]?B)", r.stdout)
        if m:
            out["context_bytes"] = int(float(m.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)])
        out["log"] = r.stdout
        _prune(tag)
    return {**out, "how": "built", "seconds": time.monotonic() - t0}


def _epoch(created_at: str) -> float:
    """``docker images``' CreatedAt ("2026-12-07 18:49:03 +0000 UTC") as a Unix time (0 if odd)."""
    try:
        return datetime.strptime(created_at[:25], "%Y-%m-%d %H:%M:%S %z").timestamp()
    except ValueError:
        return 0.0


def _prune(keep: str) -> None:
    """Remove ``spotckpt-test`` tags beyond the newest few, never one a live session holds
    (another checkout's run on the same engine), one made in the last hours (a session of a
    version that did not hold its tag) nor one a container uses (``rmi`` without ``-f``
    refuses), and dangling layers."""
    r = eng.cli("images", "spotckpt-test", "--format", "{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}",
                check=False, timeout=60)
    rows = sorted((x.split("\t") for x in r.stdout.splitlines() if "\t" in x), reverse=True)
    held = eng.tags_in_use() | {keep}
    cutoff = time.time() - KEEP_HOURS * 3600
    old = [t for created, t in rows if t not in held and _epoch(created) < cutoff][KEEP_TAGS - 1:]
    if old:
        eng.cli("rmi", *old, check=False, timeout=300)
    eng.cli("image", "prune", "-f", check=False, timeout=300)
