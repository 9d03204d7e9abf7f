"""Committing a directory a framework wrote itself (a Transformers ``checkpoint-N/``) as one
checkpoint step, through the same commit protocol as a state save.

:func:`stage` runs in the training thread and only makes hard links (a copy where the
directory is on another filesystem than the local dir), so the framework may delete or
rotate its directory right after; :func:`move_into` runs in the background writer and
moves the staged files into the commit's temp dir, fsyncs and checksums them. Manifest,
rename, upload, retention and restore are the normal ones (``serializer`` :data:`DIR`).

Hard links share the file with the framework's copy: a framework that rewrote a file of the
same directory *in place* (``open(..., "wb")`` truncates the inode) would change the
committed bytes. The caller removes the framework's directory before it is written a
second time (the Transformers callback does, for a second save at the same global step);
a change that slipped through is caught by the checksum at restore (quarantine, fall back).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from spotckpt._errors import ConfigError

from ._local import STEP_MARKER, LocalDir, fsync_dir
from ._manifest import FileEntry, file_digest

DIR = "dir"  # the manifest's serializer for a committed directory: restore hands back its path


def stage(local: LocalDir, src: Path, step: int, only: Callable[[str], bool] | None = None) -> Path:
    """Link every file under ``src`` (whose ``/``-separated relative path ``only`` accepts)
    into a fresh hidden temp dir of ``local`` and return it.

    Raises:
        ConfigError: ``src`` is not a directory.
    """
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"spotckpt: cannot commit {src} as step {step}: not a directory")
    tmp = local.begin(step)
    try:
        for root, dirs, files in os.walk(src):
            rel = Path(root).relative_to(src)
            for d in dirs:
                (tmp / rel / d).mkdir()
            for f in files:
                if (rel == Path(".") and f == STEP_MARKER) or (only is not None and not only((rel / f).as_posix())):
                    continue
                _link(Path(root) / f, tmp / rel / f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _link(src: Path, dst: Path) -> None:
    if not src.is_symlink():
        try:
            os.link(src, dst)
            return
        except OSError as e:  # another filesystem, or links not allowed there
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copyfile(src, dst)  # (a symlink: its target's bytes, never the link)


def move_into(staged: Path, tmp: Path) -> list[FileEntry]:
    """Move the staged files into the commit's temp dir ``tmp``; fsync and checksum each.

    Returns:
        The file entries for the manifest (the step marker excluded).
    """
    entries: list[FileEntry] = []
    for child in sorted(staged.iterdir()):
        if child.name != STEP_MARKER:
            os.rename(child, tmp / child.name)
    for root, dirs, files in os.walk(tmp):
        for f in sorted(files):
            p = Path(root) / f
            rel = p.relative_to(tmp).as_posix()
            if rel == STEP_MARKER:
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            entries.append(FileEntry(rel, p.stat().st_size, file_digest(p)))
        for d in dirs:
            fsync_dir(Path(root) / d)
    shutil.rmtree(staged, ignore_errors=True)
    return entries
