"""What is in the watched dir: one walk of the local dir (sync layer, no ML imports).

spotckpt's own entries are skipped (:func:`spotckpt._commit._local.is_internal`), names that are not valid
UTF-8 are skipped with one warning each (they cannot be named in a file set), and symlinks
are kept only when they point inside the dir (one pointing outside is never followed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from spotckpt._commit import is_internal


def link_inside(rel: str, target: str) -> bool:
    """Whether symlink ``rel`` -> ``target`` (relative to the dir) stays inside the dir."""
    if os.path.isabs(target):
        return False
    joined = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    return not (joined == ".." or joined.startswith("../") or joined == ".")


def scan(root: Path, warn_once: Callable[..., None],
         unreadable: set[str] | None = None) -> tuple[dict[str, os.stat_result], dict[str, str],
                                                      dict[str, list[str]]]:
    """``(files, links, dirs)``: regular files -> stat, in-dir symlinks -> target, dirs ->
    the names directly inside; one ``os.scandir`` per dir, one stat per file. Dirs (or
    entries) that cannot be read go into ``unreadable`` with a warning: what they hold is
    unknown, not deleted."""
    unreadable = set() if unreadable is None else unreadable
    files: dict[str, os.stat_result] = {}
    links: dict[str, str] = {}
    dirs: dict[str, list[str]] = {}
    stack = [(str(root), "")]
    while stack:
        d, rel_dir = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as err:  # permissions, I/O
            unreadable.add(rel_dir.rstrip("/"))
            warn_once(rel_dir, "spotckpt: cannot read %s (%s): its files are not mirrored, and "
                      "their committed copies are kept", rel_dir or ".", err.strerror or err)
            continue
        names = dirs.setdefault(rel_dir.rstrip("/"), [])
        with it:
            for e in it:
                rel = rel_dir + e.name
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:
                    warn_once(rel, "spotckpt: not mirroring %r: its name is not valid UTF-8", os.fsencode(rel))
                    continue
                if is_internal(rel, root):
                    continue
                names.append(e.name)
                try:
                    if e.is_symlink():
                        target = os.readlink(e.path)
                        if link_inside(rel, target):
                            links[rel] = target
                        else:
                            warn_once(rel, "spotckpt: not mirroring symlink %s -> %s: it points outside "
                                      "the watched dir", rel, target)
                    elif e.is_dir(follow_symlinks=False):
                        stack.append((e.path, rel + "/"))
                    elif e.is_file(follow_symlinks=False):
                        files[rel] = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    unreadable.add(rel)
                    warn_once(rel, "spotckpt: cannot read %s (%s): not mirrored, its committed copy "
                              "is kept", rel, err.strerror or err)
    return files, links, dirs
