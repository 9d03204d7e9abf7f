"""The local half of the commit protocol: temp dir, fsync, rename, manifest last.

Layout of the local dir (the dir a script also writes its own files into)::

    step-000000000100/            committed once MANIFEST.json is in it
        state.pt
        .spotckpt-step            written first: this step dir is ours (not a user dir)
        MANIFEST.json
    .step-000000000200.<id>.tmp.sagemaker-ignore/   being written; never synced
    checkpoint.pth                free-form user files, mirrored as they are
    ckpt-<name>/                  a named Checkpointer's own local dir (same layout), marked
        .spotckpt-name.sagemaker-ignore   by this file; never mirrored as user files
    rank-00001/                   one rank's part (torch.distributed), marked the same way

Nothing else of spotckpt's is in it: locks, events.jsonl, quarantine/ and the mirror's
state live in the *state dir* (:func:`state_dir`), outside the local dir, because scripts
read "the checkpoint dir is not empty" as "resume from it" (AWS's TF2 ``mnist.py``:
``max()`` of an empty list).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Mapping

from spotckpt._config import LINEAGE_PREFIX
from spotckpt._errors import CheckpointLockedError, CorruptCheckpointError, LocalDirError

from ._manifest import MANIFEST, Manifest, parse_step_dirname, step_dirname

TMP_SUFFIX = ".tmp.sagemaker-ignore"
STEP_MARKER = ".spotckpt-step"     # in each step dir we make, before it is renamed into place
STATE_ENV = "SPOTCKPT_STATE_DIR"
LEGACY_META = ".spotckpt.sagemaker-ignore"  # where earlier versions kept their state: in the local dir
_SCRATCH = "tmp"                   # state dir subdir for transient files, emptied by clean_temp()
LINEAGE_MARKER = ".spotckpt-name.sagemaker-ignore"  # in <local_dir>/ckpt-<name>/ and rank-<R>/: that dir is ours
_RANK_DIR = re.compile(r"rank-\d{5}")               # a rank's part dir (_manifest.rank_dirname)


def state_dir(root: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Path:
    """Where spotckpt keeps its own files for local dir ``root``: outside it.

    In order:

    1. ``$SPOTCKPT_STATE_DIR/<name>-<hash>/`` when that variable is set;
    2. ``<parent>/.<name>.spotckpt/`` beside the local dir, when it exists or the parent is
       writable (``/opt/ml/.checkpoints.spotckpt`` on SageMaker);
    3. ``${XDG_STATE_HOME:-~/.local/state}/spotckpt/<name>-<hash>/``.

    ``<name>`` and ``<hash>`` come from the local dir's real path (symlinks resolved), so two
    different local dirs never share a state dir, and every process on one local dir finds
    the same one (the lock is in it).

    Example:
        >>> state_dir("/opt/ml/checkpoints", env={})  # doctest: +SKIP
        PosixPath('/opt/ml/.checkpoints.spotckpt')
    """
    env = os.environ if env is None else env
    real = Path(os.path.realpath(root))
    tag = f"{real.name or 'root'}-{hashlib.sha256(os.fsencode(real)).hexdigest()[:16]}"
    base = env.get(STATE_ENV)
    if base:
        return Path(base).expanduser().absolute() / tag
    xdg = env.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(xdg):  # the XDG spec: a relative path is invalid, ignore it
        xdg = os.path.join(os.path.expanduser("~"), ".local", "state")
    fallback = Path(xdg) / "spotckpt" / tag
    if not real.name or real.parent == real:
        return fallback
    sibling = real.parent / f".{real.name}.spotckpt"
    # Once made, a state dir stays where it is (so a parent that changes writability does
    # not split the processes of one local dir between two locks).
    if sibling.is_dir() or (not fallback.is_dir() and _writable(real.parent)):
        return sibling
    return fallback


def _writable(d: Path) -> bool:
    """Whether ``d`` is (or, created with its missing parents, would be) writable by us."""
    while not d.exists():
        if d.parent == d:
            return False
        d = d.parent
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` by temp file, fsync (unless not ``sync``) and rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def is_internal(rel: str, root: str | os.PathLike[str] | None = None) -> bool:
    """True for paths that are spotckpt's or in flight: never mirrored as user files.

    Args:
        rel: a ``/``-separated path relative to the local dir (with ``root``) or to the
            remote prefix (without).
        root: the local dir. A path under ``step-N/`` is internal only when that dir is one
            of ours (:meth:`LocalDir.owns`): a user's file or dir named ``step-000000000001``
            is a user entry. Without ``root`` (a remote key) everything under ``step-N/`` is
            checkpoint payload, and a bare ``step-N`` object is a user file.
    """
    parts = rel.split("/")
    if any(part.endswith(".sagemaker-ignore") for part in parts):
        return True  # our temp files, and SageMaker's own convention for "not uploaded"
    if root is not None and (parts[0].startswith(LINEAGE_PREFIX) or _RANK_DIR.fullmatch(parts[0])):
        # a named Checkpointer's dir, or a rank's part dir, once marked as ours
        return (Path(root) / parts[0] / LINEAGE_MARKER).is_file()
    if parse_step_dirname(parts[0]) is None:
        return False
    if root is None:
        return len(parts) > 1
    return owned_step_dir(Path(root) / parts[0])


def owned_step_dir(path: Path) -> bool:
    """Whether ``path`` (named ``step-N``) is a step dir spotckpt made: it holds our marker,
    or (written before the marker existed) a manifest of ours for that step."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        if (path / STEP_MARKER).is_file():
            return True
        step = parse_step_dirname(path.name)
        if step is None:
            return False
        Manifest.from_json((path / MANIFEST).read_bytes(), expect_step=step)
        return True
    except (OSError, CorruptCheckpointError):
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


class LocalDir:
    """Committed checkpoints in one local directory, and spotckpt's state for it.

    Attributes:
        root: the local dir (shared with the script's own files).
        meta: the state dir (:func:`state_dir`): locks, ``events.jsonl``, ``quarantine/``,
            the mirror's state. Never inside ``root``.

    Example:
        >>> d = LocalDir(Path("/tmp/ck"))  # doctest: +SKIP
        >>> tmp = d.begin(100); (tmp / "state.pt").write_bytes(b"..."); d.commit(tmp, manifest)
    """

    def __init__(self, root: str | os.PathLike[str], *, state: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root)
        self.meta = Path(state) if state is not None else state_dir(self.root)
        self._lock_fd: int | None = None

    def part(self, name: str) -> LocalDir:
        """The local dir of one rank's part, ``<root>/<name>``, whose state goes in
        ``<state dir>/<name>`` (not beside it: that would be inside this local dir)."""
        return LocalDir(self.root / name, state=self.meta / name)

    def lineage(self, name: str | None) -> LocalDir:
        """The local dir of the Checkpointer named ``name`` (``None``: this one), a part
        ``<root>/ckpt-<name>/``; :meth:`mark_lineage` tells the unnamed lineage it is ours."""
        return self if name is None else self.part(LINEAGE_PREFIX + name)

    def mark_lineage(self) -> None:
        """Mark this (named) dir as spotckpt's, so a watcher of the parent skips it."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / LINEAGE_MARKER).is_file():
            write_atomic(self.root / LINEAGE_MARKER, b"spotckpt\n")

    # -- locking -------------------------------------------------------------------------
    def lock(self, role: str = "trainer") -> None:
        """Take an exclusive lock for ``role`` so two trainers never share one dir.

        Raises:
            CheckpointLockedError: another live process holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.meta.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only root filesystem: neither beside the dir nor in ~
            raise LocalDirError(
                f"spotckpt: cannot create the state dir {self.meta} for local_dir '{self.root}' "
                f"({e.strerror or e}: {e.filename}); set {STATE_ENV} to a writable dir outside the "
                "local dir (a read-only container: --tmpfs /tmp and SPOTCKPT_STATE_DIR=/tmp/spotckpt)"
            ) from e
        path = self.meta / f"{role}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                try:
                    holder = path.read_text().strip() or "another process"
                except OSError:
                    holder = "another process"
                raise CheckpointLockedError(
                    f"spotckpt: local_dir '{self.root}' is in use by {holder}; "
                    "give each training process its own local_dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- ownership -------------------------------------------------------------------------
    def owns(self, name: str) -> bool:
        """Whether the top-level entry ``name`` of the local dir is spotckpt's: one of our
        temp entries (``.<x>.<id>.tmp.sagemaker-ignore``), a step dir we made, or the state
        dir an older version kept inside the local dir. A user's file or dir that is merely
        named ``step-N`` is not."""
        if (name.startswith(".") and name.endswith(TMP_SUFFIX)) or name == LEGACY_META:
            return True
        return parse_step_dirname(name) is not None and owned_step_dir(self.root / name)

    def is_internal(self, rel: str) -> bool:
        """:func:`is_internal` for a path in this local dir."""
        return is_internal(rel, self.root)

    def scratch(self, name: str) -> Path:
        """A fresh dir for transient files in the state dir (removed by :meth:`clean_temp`)."""
        d = self.meta / _SCRATCH / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    # -- commit ----------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh hidden temp dir to write step ``step``'s payload into, marked as ours."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{step_dirname(step)}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        tmp.mkdir()
        (tmp / STEP_MARKER).write_bytes(b"spotckpt\n")  # fsynced with the payload's dir
        return tmp

    def commit(self, tmp: Path, manifest: Manifest) -> Path:
        """Move a fully written, fsynced temp dir into place, then write the manifest.

        Returns:
            The committed checkpoint dir.

        Raises:
            LocalDirError: a user entry (not ours) has the step dir's name.
        """
        final = self.root / step_dirname(manifest.step)
        if final.exists() or final.is_symlink():
            if not owned_step_dir(final):
                shutil.rmtree(tmp, ignore_errors=True)
                raise LocalDirError(
                    f"spotckpt: cannot commit step {manifest.step}: '{final}' is not a spotckpt "
                    "checkpoint (it has no .spotckpt-step marker); spotckpt never touches it. "
                    "Move or rename it: spotckpt names its checkpoints step-<12 digits>")
            if (final / MANIFEST).exists():
                # This step is already committed (e.g. a final save right after a periodic one).
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final)  # a leftover of ours without manifest: it never existed
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.root)
        write_atomic(final / MANIFEST, manifest.to_json())
        return final

    def clean_temp(self) -> None:
        """Remove our temp entries and manifest-less step dirs left by a crash (only ours:
        a user's entry named ``step-N`` stays), and the state dir's transient files."""
        for p in self.root.iterdir() if self.root.exists() else ():
            if p.name.endswith(TMP_SUFFIX) and p.name.startswith("."):
                _remove(p)
            elif (parse_step_dirname(p.name) is not None and not (p / MANIFEST).exists()
                    and owned_step_dir(p)):
                shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(self.meta / _SCRATCH, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------
    def path(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def is_committed(self, step: int) -> bool:
        """Whether step ``step`` is committed here (a step dir of ours with its manifest)."""
        p = self.path(step)
        return (p / MANIFEST).is_file() and owned_step_dir(p)

    def committed(self) -> list[int]:
        """Steps with a manifest, oldest first (step dirs of ours only)."""
        out = []
        if not self.root.exists():
            return out
        for p in self.root.iterdir():
            step = parse_step_dirname(p.name)
            if step is not None and (p / MANIFEST).is_file() and owned_step_dir(p):
                out.append(step)
        return sorted(out)

    def read_manifest(self, step: int) -> Manifest:
        p = self.path(step) / MANIFEST
        try:
            return Manifest.from_json(p.read_bytes(), expect_step=step)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"spotckpt: {p} is missing") from None

    # -- removal ---------------------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Un-commit (manifest first) then remove a checkpoint of ours."""
        p = self.path(step)
        if not owned_step_dir(p):
            return
        try:
            (p / MANIFEST).unlink()
        except FileNotFoundError:
            pass
        # Out of the way first: while rmtree removed the files one by one (the marker among
        # them), what was left of step-N/ could look like a user dir to the watched dir.
        gone = self.root / f".{p.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        try:
            os.rename(p, gone)
        except OSError:
            gone = p
        shutil.rmtree(gone, ignore_errors=True)

    def quarantine(self, step: int) -> Path:
        """Move a bad checkpoint aside (kept for inspection, invisible to restore)."""
        return self.set_aside(self.path(step), f"{step_dirname(step)}-{int(time.time())}-{uuid.uuid4().hex[:6]}")

    def set_aside(self, src: Path, name: str) -> Path:
        """Move ``src`` into the state dir's ``quarantine/`` as ``name``.

        Raises:
            LocalDirError: it cannot be moved.
        """
        qdir = self.meta / "quarantine"
        dest = qdir / name
        try:
            qdir.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(src, dest)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                shutil.move(src, dest)  # the state dir is on another filesystem
        except OSError as e:
            raise LocalDirError(f"spotckpt: cannot quarantine {src}: {e}") from e
        return dest
