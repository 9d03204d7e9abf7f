"""What a starting job resumes from: the newest committed checkpoint that suits it, loaded.

User-API layer. One process restores the newest checkpoint over the local dir and the
remote (and the files the script wrote itself); the ranks of a torch.distributed job restore
the same step together (``_distributed.restore``). Either way a checkpoint of another world
size stops the job at once with a clear error (``WorldSizeError``) unless DCP reshards it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import _distributed, _state
from ._engine import restore_newest
from ._events import EventLog, log
from ._local import LocalDir
from ._store import RemoteStore, redact
from ._watch_pull import restore_files


def resume(state: dict[str, Any], *, root: Path, local: LocalDir, store: RemoteStore | None,
           remote: str | None, d: _distributed.Dist | None,
           events: EventLog) -> tuple[int, Any, bool] | None:
    """Restore and load the newest checkpoint into ``state``.

    Args:
        root: the configured local dir (``local`` is a rank's part of it under ranks).
        remote: the configured remote (None: local only, the ranks sharing ``root/shared/``).

    Returns:
        ``(step, manifest, durable)``, or None for a fresh start.

    Raises:
        WorldSizeError: the newest checkpoint was written by another world size.
    """
    if not remote:
        _distributed.check_local(root, d)
    if d is not None:
        return _distributed.restore(d, local, store, state, events=events)
    where = redact(remote or "")
    found = restore_newest(local, store, events=events,
                           accept=lambda m: _distributed.check_world(m, where=where, d=None))
    if store is not None:
        # the files the script writes itself come back too: the in-process
        # watcher mirrors the dir as it is, deletes included (_watch.py)
        restore_files(local, store, events=events)
    if found is not None:
        step, manifest, _ = found
        missing = _state.apply(state, _state.read_state(local.path(step), manifest.serializer))
        if missing:
            log.warning("spotckpt: checkpoint step %d has no entry for %s; left as is", step, missing)
    return found
