"""Stale local state: a local dir older than the remote never wins over newer durable state.

Sync layer (no ML imports). A machine can sit out (stopped, its volume kept) while another
instance of the job takes it further on the remote; when something starts on that dir again,
what it holds is older than what is durable: checkpoints below the remote's newest, a dead
branch's checkpoints that never became durable (made before the remote's newest was
committed), watched files whose committed version is newer. Every entry point either defers to
the remote (a restore sets the local copies aside in the state dir and takes the remote's:
:func:`superseded` in :func:`._restore.restore_newest`, :func:`spotckpt._watch.older` in the
watched dir's restore) or, when it cannot (``spotckpt push``, ``spotckpt run --no-pull``),
refuses with :class:`StaleLocalError` before it writes anything (:func:`check_not_stale`).

"Older" compares what the manifests record: a checkpoint is superseded by the remote's newest
when that one is another checkpoint (not the same files) and either a higher step or committed
at or after it (``created``; a dead branch's checkpoints were made before the other instance
committed its own). Only the newest generation's checkpoints count on the remote
(:func:`spotckpt._remote.order`).
"""
from __future__ import annotations

from spotckpt._commit import LocalDir, Manifest
from spotckpt._errors import CorruptCheckpointError, RemoteError, StaleLocalError
from spotckpt._events import redact
from spotckpt._remote import RemoteStore, order
from spotckpt._watch import newest_set, stale_files


def same_checkpoint(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests name the same files (path, size, checksum): one checkpoint, maybe
    stamped with another generation."""
    return a.step == b.step and sorted((e.path, e.size, e.digest) for e in a.files) == \
        sorted((e.path, e.size, e.digest) for e in b.files)


def superseded(local: Manifest, remote: Manifest) -> bool:
    """Whether the local checkpoint is older than the remote's newest one (which then wins)."""
    if same_checkpoint(local, remote):
        return False
    return remote.step > local.step or remote.created >= local.created


def remote_newest(store: RemoteStore, steps: list[int] | None = None) -> Manifest | None:
    """The manifest of the checkpoint a restore would take first on the remote (newest
    generation, then newest step), or None; unreadable manifests are passed over."""
    steps = store.committed() if steps is None else steps
    read: dict[int, Manifest] = {}

    def manifest(s: int) -> Manifest:
        if s not in read:
            read[s] = store.read_manifest(s)
        return read[s]
    for s in order(store, steps, manifest):
        try:
            return manifest(s)
        except (CorruptCheckpointError, RemoteError):
            continue
    return None


def stale_reasons(local: LocalDir, store: RemoteStore) -> list[str]:
    """Why the local dir is older than the remote (empty: it is not): its newest checkpoint is
    :func:`superseded`, or watched files are older than their committed versions."""
    out = []
    steps = local.committed()
    if steps:
        try:
            mine = local.read_manifest(steps[-1])
        except CorruptCheckpointError:
            mine = None
        theirs = remote_newest(store)
        if mine is not None and theirs is not None and superseded(mine, theirs):
            out.append(f"its newest checkpoint is step {mine.step} and the remote's is step {theirs.step}, "
                       + ("a newer one" if theirs.step >= mine.step else "committed after it"))
    files = stale_files(local.root, newest_set(store))
    if files:
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        out.append(f"{len(files)} file(s) older than their committed version ({', '.join(files[:3])}{more})")
    return out


def check_not_stale(local: LocalDir, store: RemoteStore, what: str, how: str) -> None:
    """Raises :class:`StaleLocalError` (one line: what is older, what to do) if the local
    dir is older than the remote."""
    why = stale_reasons(local, store)
    if why:
        raise StaleLocalError(
            f"{what}: {local.root} is older than {redact(store.url)} ({'; '.join(why)}): another instance "
            f"took the job further while this dir sat out; nothing was written. {how}")
