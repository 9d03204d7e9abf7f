"""Opening a :class:`~spotckpt.Checkpointer`: settings, the lineage's local dir and remote,
notices, restore of the newest checkpoint, and the background threads.

User-API layer: a mixin of :class:`~spotckpt._checkpointer.Checkpointer` (``open`` is its
longest method and the one job of starting up; the rest of the class runs the loop).
"""
from __future__ import annotations

import os

from . import _dircommit, _distributed, _lineage, _state
from ._config import Config, supervised
from ._engine import Engine, restore_newest
from ._errors import ConfigError
from ._events import EventLog, log
from ._layout import RankLayout, rank_dirname
from ._local import LocalDir
from ._metadata import MetadataWatcher, sources_from_env
from ._notices import LifelineSource, SignalSource
from ._planner import FlushPlanner
from ._policies import make_policy
from ._store import RemoteStore
from ._syncer import Syncer
from ._watch_pull import restore_files
from ._writer import BackgroundWriter


class Startup:
    """``open()`` for the Checkpointer (whose ``__init__`` sets the attributes used here)."""

    _lineage_key: tuple[int, str] | None = None

    def open(self) -> None:
        """Validate settings, take the local dir, restore the newest checkpoint, start the
        background threads and the signal handlers."""
        cfg = self.config = Config.resolve(**self._args)
        d = self._dist = _distributed.detect()
        # A named lineage has its own dir and remote prefix; under `spotckpt run` it still
        # uploads itself (the supervisor syncs the unnamed lineage and the script's files).
        sup = supervised() and cfg.name is None
        local = LocalDir(cfg.local_dir).lineage(cfg.name)
        # one rank of many: its own part dir, so ranks sharing a host never collide
        local = self._local = local if d is None else local.part(rank_dirname(d.rank))
        self._lineage_key = _lineage.claim(cfg.lineage_remote,
                                           _lineage.describe(self.state, local.root, cfg.name))
        try:
            local.lock()
        except BaseException:
            _lineage.release(self._lineage_key)
            self._lineage_key = None
            raise
        try:
            if cfg.name is not None:
                LocalDir(cfg.local_dir).lineage(cfg.name).mark_lineage()
            # Notices first: a SIGTERM during the restore (a big download, a slow load) is
            # recorded, and the first step boundary then does the interruption save instead
            # of the process dying with a local-only checkpoint never uploaded.
            self._signals = SignalSource(self._board, cfg.signals, cfg.grace_seconds)
            self._signals.install()
            if supervised():
                self._lifeline = LifelineSource.from_env(self._board, cfg.grace_seconds)
                if self._lifeline is not None:
                    self._lifeline.start()
            local.clean_temp()
            events = self.events = EventLog(local.meta / "events.jsonl")
            store = None
            remote = cfg.lineage_remote
            if d is not None and not remote:  # ranks on one host commit through a shared dir
                remote = f"file://{local.root.parent}/shared/"
            if remote and not sup:
                store = RemoteStore(remote, cfg.storage_options)
                store.probe()
            self._policy = make_policy(cfg.every_steps, cfg.every_seconds, self.clock)
            if d is None:
                found = restore_newest(local, store, events=events)
                if store is not None and cfg.name is None:
                    # the files the script writes itself come back too: the in-process
                    # watcher mirrors the dir as it is, deletes included (_watch.py)
                    restore_files(local, store, events=events)
            else:
                found = _distributed.restore(d, local, store, events=events)
            if found is not None:
                step, manifest, durable = found
                if (manifest.serializer == _dircommit.DIR) != (self.state is None):
                    raise ConfigError(
                        f"spotckpt: checkpoint step {step} in {cfg.local_dir} (or the remote) was written "
                        f"by a {manifest.framework} job that {'commits directories' if self.state is not None else 'saves a state'}; "
                        "this one does not: use a new local_dir/remote for a different job")
                if self.state is None:
                    self.restored_path = local.path(step)
                else:
                    payload = _state.read_state(local.path(step), manifest.serializer)
                    missing = _state.apply(self.state, payload)
                    if missing:
                        log.warning("spotckpt: checkpoint step %d has no entry for %s; left as is", step, missing)
                self.step = self.restored_step = self._last_saved = step
                log.info("spotckpt: resumed from step %d", step)
            if store is not None:
                self._syncer = Syncer(local, store, keep_last=cfg.keep_last, events=events,
                                      mirror=d is None and cfg.name is None)
                if d is not None:
                    self._syncer.layout = RankLayout(d.rank, d.world_size, wait_seconds=cfg.grace_seconds)
                self._syncer.start()
                if found is not None and not found[2]:
                    self._syncer.submit(found[0])
                elif found is not None:
                    self._syncer.durable_step = found[0]  # restored from a remote commit
            self._engine = Engine(local, syncer=self._syncer, keep_last=cfg.keep_last, events=events,
                                  local_retention=not sup,
                                  rank=0 if d is None else d.rank,
                                  world_size=1 if d is None else d.world_size)
            self._writer = BackgroundWriter()
            self._planner = FlushPlanner(uploads=store is not None)
            if self._syncer is not None:
                self._syncer.on_upload = self._after_upload
                self._engine.retention_after_upload = True
            self._watcher = MetadataWatcher(
                self._board, sources_from_env(), on_advise=self._board.advise,
                interval=float(os.environ.get("SPOTCKPT_METADATA_INTERVAL") or 5.0))
            self._watcher.start()
            self._open = True
        except BaseException:
            self._teardown()
            raise

    def _after_upload(self, step: int, nbytes: int, seconds: float) -> None:
        """Syncer thread: learn the upload rate; drop local checkpoints that were kept only
        because they were still uploading."""
        self._planner.record_upload(nbytes, seconds)
        if self._engine is not None:
            self._engine.retention()

