"""The local half of the commit protocol: temp dir, fsync, rename, manifest last.

Layout of the local dir::

    step-000000000100/            committed once MANIFEST.json is in it
        state.pt
        MANIFEST.json
    .step-000000000200.<id>.tmp.sagemaker-ignore/   being written; never synced
    .spotckpt.sagemaker-ignore/   our own state: lock, events.jsonl, quarantine/
    checkpoint.pth                free-form user files, mirrored as they are
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
import uuid
from pathlib import Path

from ._errors import CheckpointLockedError, CorruptCheckpointError, LocalDirError
from ._manifest import MANIFEST, Manifest, parse_step_dirname, step_dirname

META = ".spotckpt.sagemaker-ignore"
TMP_SUFFIX = ".tmp.sagemaker-ignore"


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


def is_internal(rel: str) -> bool:
    """True for paths that belong to spotckpt or are in flight: never mirrored as user files."""
    for part in rel.split("/"):
        if part.endswith(".sagemaker-ignore") or part == META:
            return True
    first = rel.split("/", 1)[0]
    return parse_step_dirname(first) is not None


class LocalDir:
    """Committed checkpoints in one local directory.

    Example:
        >>> d = LocalDir(Path("/tmp/ck"))  # doctest: +SKIP
        >>> tmp = d.begin(100); (tmp / "state.pt").write_bytes(b"..."); d.commit(tmp, manifest)
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = self.root / META
        self._lock_fd: int | None = None

    # -- locking -------------------------------------------------------------------------
    def lock(self, role: str = "trainer") -> None:
        """Take an exclusive lock for ``role`` so two trainers never share one dir.

        Raises:
            CheckpointLockedError: another live process holds it.
        """
        self.meta.mkdir(parents=True, exist_ok=True)
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

    # -- commit ----------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """A fresh hidden temp dir to write step ``step``'s payload into."""
        tmp = self.root / f".{step_dirname(step)}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, manifest: Manifest) -> Path:
        """Move a fully written, fsynced temp dir into place, then write the manifest.

        Returns:
            The committed checkpoint dir.
        """
        final = self.root / step_dirname(manifest.step)
        if (final / MANIFEST).exists():
            # This step is already committed (e.g. a final save right after a periodic one).
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():  # a leftover without manifest: it never existed
            shutil.rmtree(final)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.root)
        write_atomic(final / MANIFEST, manifest.to_json())
        return final

    def clean_temp(self) -> None:
        """Remove temp dirs and manifest-less step dirs left by a crash."""
        for p in self.root.iterdir() if self.root.exists() else ():
            if p.name.endswith(TMP_SUFFIX) and p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
            elif parse_step_dirname(p.name) is not None and p.is_dir() and not (p / MANIFEST).exists():
                shutil.rmtree(p, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------
    def path(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def committed(self) -> list[int]:
        """Steps with a manifest, oldest first."""
        out = []
        if not self.root.exists():
            return out
        for p in self.root.iterdir():
            step = parse_step_dirname(p.name)
            if step is not None and (p / MANIFEST).is_file():
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
        """Un-commit (manifest first) then remove a checkpoint."""
        p = self.path(step)
        try:
            (p / MANIFEST).unlink()
        except FileNotFoundError:
            pass
        shutil.rmtree(p, ignore_errors=True)

    def quarantine(self, step: int) -> Path:
        """Move a bad checkpoint aside (kept for inspection, invisible to restore)."""
        qdir = self.meta / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True)
        dest = qdir / f"{step_dirname(step)}-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        try:
            os.rename(self.path(step), dest)
        except OSError as e:
            raise LocalDirError(f"spotckpt: cannot quarantine {self.path(step)}: {e}") from e
        return dest
