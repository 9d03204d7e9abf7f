"""What a starting job resumes from: the newest committed checkpoint that suits it, loaded.

User-API layer. One process restores the newest checkpoint over the local dir and the
remote (and the files the script wrote itself); the ranks of a torch.distributed job restore
the same step together (``_distributed.restore``). Either way a checkpoint of another world
size stops the job at once with a clear error (``WorldSizeError``) unless DCP reshards it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from spotckpt._commit import LocalDir, _dircommit
from spotckpt._errors import ConfigError, CorruptCheckpointError
from spotckpt._events import EventLog, log, redact
from spotckpt._remote import RemoteStore
from spotckpt._state import _snapshot as _state
from spotckpt._sync import restore_newest
from spotckpt._watch import restore_files

from . import _distributed


def resume(state: dict[str, Any] | None, *, root: Path, local: LocalDir, store: RemoteStore | None,
           remote: str | None, d: _distributed.Dist | None,
           events: EventLog, files: bool = True,
           check: Callable[[], None] | None = None) -> tuple[int, Any, bool] | None:
    """Restore and load the newest checkpoint into ``state`` (None: a job that commits
    directories, :meth:`Checkpointer.commit_dir`; the step's dir is restored, not loaded).

    Args:
        root: the configured local dir (``local`` is a rank's part of it under ranks).
        remote: the configured remote (None: local only, the ranks sharing ``root/shared/``).
        files: also restore the files the script wrote itself (the unnamed lineage).
        check: called before a remote checkpoint's files are fetched; raises to stop (the
            generation claim made beside the restore's listing: waited for, so that a
            read-only bucket stops the start before a long download).

    Returns:
        ``(step, manifest, durable)``, or None for a fresh start.

    Raises:
        WorldSizeError: the newest checkpoint was written by another world size.
        ConfigError: it was written by a job of the other kind (state / directories).
    """
    if not remote:
        _distributed.check_local(root, d)
    where = redact(remote or "")
    if d is not None:
        def kind(m: Any) -> None:
            _check_kind(m, state, where)
        return _distributed.restore(d, local, store, state, events=events, accept=kind)
    # the files the script writes itself come back too (the in-process watcher mirrors the
    # dir as it is, deletes included: _watch/_watcher.py), beside the checkpoint's download:
    # their listings wait for nothing of it (issue 25). Only the paths their set names.
    beside = InThread(lambda: restore_files(local, store, events=events)) if store is not None and files else None
    try:
        while True:
            found = restore_newest(local, store, events=events,
                                   accept=lambda m: (check is not None and check(),
                                                     _distributed.check_world(m, where=where, d=None),
                                                     _check_kind(m, state, where)))
            if found is not None:
                _check_kind(found[1], state, where)  # a local checkpoint is not seen by `accept`
            if found is None or state is None:
                break
            step, manifest, durable = found
            try:
                saved = _state.read_state(local.path(step), manifest.serializer, manifest)
            except CorruptCheckpointError as e:
                # It passed its checksums, yet does not load (a payload whose header lies): the
                # same quarantine as a checksum failure, then the previous checkpoint.
                log.warning("%s; quarantined, trying an older checkpoint", e)
                events.emit("quarantine", step=step, where="local", error=str(e))
                local.quarantine(step)
                if durable and store is not None:
                    store.quarantine(step)  # the very same bytes (same manifest): else restored again
                continue
            missing = _state.apply(state, saved)
            if missing:
                log.warning("spotckpt: checkpoint step %d has no entry for %s; left as is", step, missing)
            break
    finally:
        if beside is not None:
            beside.join()
    if beside is not None:
        beside.result()
    return found


def _check_kind(m: Any, state: dict[str, Any] | None, where: str) -> None:
    """A job that saves a state cannot resume from a committed directory, nor the reverse."""
    if (m.serializer == _dircommit.DIR) != (state is None):
        raise ConfigError(
            f"spotckpt: checkpoint step {m.step} in {where or 'the local dir'} was written by a "
            f"{m.framework} job that {'commits directories' if state is not None else 'saves a state'}; "
            "this one does not: use a new local_dir/remote for a different job")


class InThread:
    """``fn()`` in a thread of its own: :meth:`result` waits and returns or raises its outcome."""

    def __init__(self, fn: Callable[[], Any], name: str = "spotckpt-beside") -> None:
        self._out: Any = None
        self._error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._out = self._fn()
        except BaseException as e:  # noqa: BLE001 - raised by result()
            self._error = e

    def join(self) -> None:
        self._thread.join()


    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out
