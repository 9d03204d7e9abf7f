"""The on-disk format of a checkpoint and its verification: the commit protocol's local half.

Format layer, no ML imports. A checkpoint is ``step-<N>/`` with payload files and a
``MANIFEST.json`` written last (:mod:`._manifest`: the manifest, its checksums, step and
rank names); the local checkpoint dir with its temp dirs, lock and retention
(:mod:`._local`); a directory a framework wrote itself committed as one step
(:mod:`._dircommit`).
"""
from __future__ import annotations

from . import _dircommit
from ._local import (
                     LINEAGE_MARKER,
                     STATE_ENV,
                     STEP_MARKER,
                     TMP_SUFFIX,
                     LocalDir,
                     fsync_dir,
                     is_internal,
                     owned_step_dir,
                     state_dir,
                     write_atomic,
)
from ._manifest import (
                     _MAX_FILE_SIZE,
                     MANIFEST,
                     MAX_STEP,
                     FileEntry,
                     Manifest,
                     build_manifest,
                     check_relpath,
                     file_digest,
                     hasher,
                     parse_step_dirname,
                     rank_dirname,
                     step_dirname,
                     verify_dir,
)

__all__ = ["_MAX_FILE_SIZE", "LINEAGE_MARKER", "MANIFEST", "MAX_STEP", "STATE_ENV", "STEP_MARKER", "TMP_SUFFIX", "FileEntry",
           "LocalDir", "Manifest", "build_manifest", "check_relpath", "file_digest", "fsync_dir", "hasher",
           "is_internal", "owned_step_dir", "parse_step_dirname", "rank_dirname", "state_dir", "step_dirname",
           "verify_dir", "write_atomic", "_dircommit"]
