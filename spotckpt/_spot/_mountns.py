"""A private ``/opt/ml`` for one emulated instance: a Linux mount namespace.

Process layer. ``python -m spotckpt._spot._mountns HOST_DIR TARGET -- CMD...`` enters a new mount
namespace, bind-mounts ``HOST_DIR`` on ``TARGET`` (``/opt/ml``) there, and execs ``CMD``:
the command and everything it starts see ``HOST_DIR`` at ``/opt/ml``, as a SageMaker
container sees its own, while the host's ``/opt/ml`` (and another job's) stays untouched
and unseen. Nothing is mounted outside the namespace; it ends with its last process.

- As root: ``unshare(CLONE_NEWNS)``. Otherwise a user namespace as well
  (``CLONE_NEWUSER``) with the caller's own uid and gid mapped to themselves: the mounts are
  made with the namespace's capabilities, which ``execve`` then drops, so the command runs
  as the same user, unprivileged.
- Mounts are made private first (no propagation back to the host).
- If ``TARGET`` does not exist (``/opt/ml`` on a machine that never ran SageMaker code),
  its parent (``/opt``) is covered inside the namespace by a tmpfs holding bind mounts of
  its original entries plus the new mount point: the host's ``/opt`` is not modified.

:func:`probe` tells, before any start, whether this works here (kernel, seccomp, a
container without ``CAP_SYS_ADMIN``, ``kernel.unprivileged_userns_clone=0``, AppArmor's
``apparmor_restrict_unprivileged_userns``): it returns the reason when it does not.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from typing import NoReturn, Sequence

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
FORCE_ENV = "SPOTCKPT_MOUNTNS_USER"  # "1": use a user namespace even as root (tests)

_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:  # loaded on use: importing this module works on any OS
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


class NamespaceError(OSError):
    """The namespace or one of its mounts could not be made."""


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else os.fsencode(s))
    _check(_libc().mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src or fstype} on {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter(host_dir: str, target: str = "/opt/ml") -> None:
    """Enter a new mount namespace in which ``host_dir`` is mounted on ``target``.

    Raises:
        NamespaceError: not permitted here, or a mount failed.
    """
    uid, gid = os.getuid(), os.getgid()
    user = os.geteuid() != 0 or os.environ.get(FORCE_ENV) == "1"
    _check(_libc().unshare(CLONE_NEWNS | (CLONE_NEWUSER if user else 0)),
           "unshare(CLONE_NEWNS" + (" | CLONE_NEWUSER)" if user else ")"))
    if user:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if not os.path.isdir(target):
        _cover_parent(target)
    _mount(host_dir, target, None, MS_BIND | MS_REC)


def _cover_parent(target: str) -> None:
    """Make a mount point for ``target`` without touching the host: a tmpfs over its parent,
    holding bind mounts of the parent's original entries (read through a descriptor opened
    before the tmpfs covered them)."""
    parent, name = os.path.split(target.rstrip("/"))
    if not os.path.isdir(parent):
        raise NamespaceError(2, f"{parent} does not exist: no place for a private {target}")
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.fstat(fd)
        _mount("tmpfs", parent, "tmpfs", 0, f"mode={st.st_mode & 0o7777:o}")
        below = f"/proc/self/fd/{fd}"
        for entry in os.listdir(below):
            src, dst = f"{below}/{entry}", os.path.join(parent, entry)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
                continue
            if os.path.isdir(src):
                os.mkdir(dst)
            else:
                open(dst, "w").close()
            _mount(src, dst, None, MS_BIND | MS_REC)
        os.mkdir(os.path.join(parent, name))
    finally:
        os.close(fd)


def probe(target: str = "/opt/ml") -> str | None:
    """None if a private ``target`` can be made here; else why not (one line)."""
    if not sys.platform.startswith("linux"):
        return f"mount namespaces are Linux only (this is {sys.platform})"
    try:
        r = subprocess.run([sys.executable, "-m", "spotckpt._spot._mountns", "--probe", target],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the probe did not run: {e}"
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"the probe exited with status {r.returncode}"])[-1]


def main(argv: Sequence[str]) -> NoReturn:
    if len(argv) == 2 and argv[0] == "--probe":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="spotckpt-mountns-") as d:
            open(os.path.join(d, "probe"), "w").close()
            try:
                enter(d, argv[1])
            except OSError as e:
                sys.exit(f"cannot make a private {argv[1]}: {e}")
            sys.exit(0 if os.path.exists(os.path.join(argv[1], "probe")) else 1)
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: python -m spotckpt._spot._mountns HOST_DIR TARGET -- CMD [ARGS...]")
    host_dir, target, cmd = argv[0], argv[1], list(argv[3:])
    try:
        enter(os.path.abspath(host_dir), target)
    except OSError as e:
        sys.exit(f"spotckpt: cannot make a private {target}: {e}")
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        sys.exit(f"spotckpt: cannot start {cmd[0]!r}: {e.strerror or e}")


if __name__ == "__main__":
    main(sys.argv[1:])
