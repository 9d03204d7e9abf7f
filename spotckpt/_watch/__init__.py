"""The watched dir: files a training script writes itself, mirrored as committed file sets.

Source layer, no ML imports. A pass of :class:`Watcher` (:mod:`._watcher`) scans the local
dir (:mod:`._scan`), uploads each changed version verified unchanged while read
(:mod:`._upload`), keeps only versions that stayed closed (:mod:`._closed`), and commits
them as one file set, manifest last (:mod:`._fileset`); directory checkpoints such as
Transformers' ``checkpoint-N/`` are one unit (:mod:`._rules`).
:func:`restore_files` (:mod:`._pull`) brings the newest verified set back; what a writer starts
from, may delete and must not upload is :mod:`._baseline` (:func:`stale_files`: local files
older than their committed version).
"""
from __future__ import annotations

from ._baseline import stale_files
from ._fileset import FileSet, newest_set
from ._pull import restore_files
from ._rules import DirRule, WriterGate, rules_from_env
from ._watcher import Watcher

__all__ = ["DirRule", "FileSet", "Watcher", "WriterGate", "newest_set", "restore_files", "rules_from_env",
           "stale_files"]
