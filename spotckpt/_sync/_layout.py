"""Where a checkpoint's files go on the remote, for one process or for many ranks.

Sync layer (no ML imports). With one process, ``step-N/<file>`` and ``step-N/MANIFEST.json``.
With ``world_size`` ranks (torch.distributed, several hosts sharing one prefix), each rank
uploads its own part under ``step-N/rank-<R>/`` and marks it with ``rank-<R>/PART.json`` (its
local manifest). Rank 0 then waits, with a bound, for every part's marker and writes the one
``step-N/MANIFEST.json`` that lists every rank's files: the checkpoint exists only when all
parts are durable. Ranks never write each other's keys, so hosts cannot overwrite each other.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

from spotckpt._commit import MANIFEST, FileEntry, Manifest, rank_dirname, step_dirname
from spotckpt._errors import CorruptCheckpointError, RemoteError
from spotckpt._remote import Fence, RemoteStore, generation_of, payload_dir, with_generation

PART = "PART.json"


def _generation_dir(name: str) -> bool:
    """Whether ``name`` (under ``step-N/``) is a generation's payload dir ``g-<G>``."""
    return len(name) == 14 and name.startswith("g-") and name[2:].isdigit()


def upload_dir(rel: str) -> str:
    """The dir of one generation's upload that ``rel`` (under ``step-N/``) is in."""
    parts = rel.split("/", 2)
    return "/".join(parts[:2]) if len(parts) > 2 and _generation_dir(parts[1]) else parts[0]


class SingleLayout:
    """One process: the plain commit protocol."""

    rank, world_size = 0, 1
    owns_retention = True
    # This instance's generation of the lineage (_remote/_fence.py); 0 and None: unfenced.
    generation = 0
    fence: Fence | None = None

    def payload_key(self, step: int, rel: str) -> str:
        return f"{payload_dir(step, self.generation)}/{rel}"

    def marker_key(self, step: int) -> str:
        return f"{step_dirname(step)}/{MANIFEST}"

    def write_marker(self, store: RemoteStore, step: int, manifest: Manifest) -> None:
        """Write this process's marker (one process: the manifest, fenced)."""
        self._commit(store, f"{step_dirname(step)}/{MANIFEST}", manifest)

    def _commit(self, store: RemoteStore, rel: str, manifest: Manifest) -> None:
        if self.fence is not None:
            self.fence.commit_manifest(rel, manifest)
        else:
            store.put_bytes(rel, with_generation(manifest, self.generation).to_json())

    def after_marker(self, store: RemoteStore, step: int, manifest: Manifest) -> None:
        """Called once this process's files and marker are durable."""

    def marker_is_ours(self, store: RemoteStore, step: int, manifest: Manifest) -> bool:
        """Whether the marker found at ``step`` stands for these very files (sizes and
        checksums: another instance of the job may have committed that step with others; the
        same files committed by an earlier generation, e.g. the checkpoint a start restored,
        are durable as they are)."""
        try:
            old = Manifest.from_json(store.cat(self.marker_key(step)), expect_step=step)
            generation_of(old)  # (a bad one is replaced)
            return set(old.files) == set(manifest.files)
        except (CorruptCheckpointError, FileNotFoundError):
            return False


class RankLayout(SingleLayout):
    """One rank of ``world_size``; rank 0 commits the combined manifest.

    Args:
        wait_seconds: how long rank 0 waits for the other ranks' parts before it gives up
            on this step with a clear error (the step then stays uncommitted).
    """

    def __init__(self, rank: int, world_size: int, *, wait_seconds: float = 120.0,
                 poll: float = 0.1, sleep: Callable[[float], None] = time.sleep) -> None:
        self.rank, self.world_size, self.wait_seconds = rank, world_size, wait_seconds
        self.poll, self._sleep = poll, sleep
        self.owns_retention = rank == 0

    def payload_key(self, step: int, rel: str) -> str:
        return f"{payload_dir(step, self.generation)}/{rank_dirname(self.rank)}/{rel}"

    def marker_key(self, step: int) -> str:
        return f"{payload_dir(step, self.generation)}/{rank_dirname(self.rank)}/{PART}"

    def write_marker(self, store: RemoteStore, step: int, manifest: Manifest) -> None:
        store.put_bytes(self.marker_key(step), with_generation(manifest, self.generation).to_json())

    def marker_is_ours(self, store: RemoteStore, step: int, manifest: Manifest) -> bool:
        """A part marker may be left by an earlier run that never committed this step (killed
        before rank 0's manifest), with other files: of another world size, or another
        training history. Such a part is replaced, never combined with this run's parts."""
        try:
            old = Manifest.from_json(store.cat(self.marker_key(step)), expect_step=step)
        except (CorruptCheckpointError, FileNotFoundError):
            return False
        return set(old.files) == set(manifest.files)

    def after_marker(self, store: RemoteStore, step: int, manifest: Manifest) -> None:
        if self.rank != 0:
            return
        d = payload_dir(step, self.generation)
        end = time.monotonic() + self.wait_seconds
        missing = list(range(self.world_size))
        while True:
            missing = [r for r in missing if not store.exists(f"{d}/{rank_dirname(r)}/{PART}")]
            if not missing:
                break
            if time.monotonic() > end:
                raise RemoteError(
                    f"spotckpt: step {step}: rank(s) {missing} did not upload their part within "
                    f"{self.wait_seconds:.0f} s; this step is not committed (did a rank die?)")
            self._sleep(self.poll)
        files: list[FileEntry] = []
        for r in range(self.world_size):
            part = Manifest.from_json(store.cat(f"{d}/{rank_dirname(r)}/{PART}"), expect_step=step)
            files += [dataclasses.replace(e, path=f"{rank_dirname(r)}/{e.path}") for e in part.files]
        combined = dataclasses.replace(manifest, files=tuple(files), world_size=self.world_size, rank=0)
        self._commit(store, f"{step_dirname(step)}/{MANIFEST}", combined)  # fenced


def part_of(manifest: Manifest, rank: int) -> Manifest:
    """The files of ``rank`` in a combined manifest, with paths relative to its part dir."""
    prefix = rank_dirname(rank) + "/"
    files = tuple(dataclasses.replace(e, path=e.path[len(prefix):])
                  for e in manifest.files if e.path.startswith(prefix))
    return dataclasses.replace(manifest, files=files, rank=rank)
