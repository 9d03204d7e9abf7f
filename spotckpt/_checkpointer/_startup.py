"""Opening a :class:`~spotckpt.Checkpointer`: settings, the lineage's local dir and remote,
notices, restore of the newest checkpoint, and the background threads.

User-API layer: a mixin of :class:`~spotckpt._checkpointer.Checkpointer` (``open`` is its
longest method and the one job of starting up; the rest of the class runs the loop).
"""
from __future__ import annotations

import os
import weakref
from typing import Any

from spotckpt._commit import LocalDir, rank_dirname
from spotckpt._config import Config, supervised
from spotckpt._events import EventLog, log, redact
from spotckpt._notices import FlushPlanner, LifelineSource, MetadataWatcher, SignalSource, sources_from_env
from spotckpt._remote import Fence, RemoteStore, claim
from spotckpt._state import BATCHES_KEY as _BATCHES_KEY
from spotckpt._sync import BackgroundWriter, Engine, RankLayout, Syncer

from . import _distributed, _lineage
from ._policies import make_policy
from ._resume import resume
from ._supervised import supervision


class Startup:
    """``open()`` for the Checkpointer (whose ``__init__`` sets the attributes used here)."""

    _lineage_key: tuple[int, str] | None = None

    def open(self) -> None:
        """Validate settings, take the local dir, restore the newest checkpoint, start the
        background threads and the signal handlers."""
        cfg = self.config = Config.resolve(**self._args)
        self._auto = None
        d = self._dist = _distributed.detect(self.state)
        # Under `spotckpt run`: the supervisor uploads one unnamed process's checkpoints in its
        # dir (`served`); ranks upload their parts in its generation; a named lineage or
        # another remote uploads itself; another dir to its remote is refused (_supervised.py).
        try:
            sv = supervision(cfg, ranked=d is not None)
        except BaseException:
            _distributed.release(d)
            raise
        sup = sv.served
        if sv.ranked is not None:  # a torch.distributed checkpoint: never a fresh start beside it
            r = sv.ranked
            _distributed.check_saved_world(int(r["step"]), int(r["world_size"]), True, str(r.get("serializer")),
                                           where=redact(cfg.remote or ""), d=d)
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
            if d is not None:
                local.mark_lineage()  # a rank's part dir is ours: never mirrored as user files
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
            events = self.events = EventLog(local.meta / "events.jsonl", role="checkpointer")
            store = fence = None
            remote = cfg.lineage_remote
            if d is not None and not remote:  # ranks on one host commit through a shared dir
                remote = f"file://{local.root.parent}/shared/"
            if remote and not sup:
                store = RemoteStore(remote, cfg.storage_options)
                store.probe()
                # A new generation of the job, before the restore: an older instance still
                # running stops at its next commit (_remote/_fence.py). Ranks share rank 0's claim.
                fence = sv.fence(store)  # ranks under `spotckpt run`: the supervisor's claim
                if fence is None and d is None:
                    fence = claim(store)
                elif fence is None:
                    f = claim(store) if d.rank == 0 else None
                    g, enforced = d.broadcast((f.generation, f.enforced) if f else None, where="generation claim")
                    fence = Fence(store, g, enforced=enforced)
                self.generation = fence.generation
            self._policy = make_policy(cfg.every_steps, cfg.every_seconds, self.clock)
            lineage_root = LocalDir(cfg.local_dir).lineage(cfg.name).root
            if self.state is not None:  # batches() positions come back with the state
                self.state[_BATCHES_KEY] = self._batches
            try:
                found = resume(self.state, root=lineage_root, local=local, store=store,
                               remote=cfg.lineage_remote, d=d, events=events,
                               files=cfg.name is None)
            finally:
                if self.state is not None:
                    self.state.pop(_BATCHES_KEY, None)
            if found is not None:
                step = found[0]
                if self.state is None:
                    self.restored_path = local.path(step)
                self.step = self.restored_step = self._last_saved = step
                log.info("spotckpt: resumed from step %d", step)
            if store is not None:
                self._syncer = Syncer(local, store, keep_last=cfg.keep_last, events=events,
                                      mirror=d is None and cfg.name is None)
                if d is not None:
                    self._syncer.layout = RankLayout(d.rank, d.world_size, wait_seconds=cfg.grace_seconds)
                self._syncer.set_fence(fence)
                self._syncer.start()
                if found is not None and not found[2]:
                    self._syncer.submit(found[0])
                elif found is not None:
                    self._syncer.durable_step = found[0]  # restored from a remote commit
            self._engine = Engine(local, syncer=self._syncer, keep_last=cfg.keep_last, events=events,
                                  local_retention=not sup,
                                  rank=0 if d is None else d.rank,
                                  world_size=1 if d is None else d.world_size)
            self._engine.generation = fence.generation if fence is not None else 0
            self._codec = _distributed.codec(self.state, d)  # DCP for a sharded state
            self._writer = BackgroundWriter()
            self._planner = FlushPlanner(uploads=store is not None)
            if self._syncer is not None:
                # weakly: a cycle would keep the Checkpointer, and the state (the model, its
                # process groups) with it, alive until the interpreter's exit (_distributed.release)
                after = weakref.WeakMethod(self._after_upload)
                self._syncer.on_upload = lambda *a: _call(after, *a)
                self._engine.retention_after_upload = True
            self._watcher = MetadataWatcher(
                self._board, sources_from_env(), on_advise=self._board.advise,
                interval=float(os.environ.get("SPOTCKPT_METADATA_INTERVAL") or 5.0))
            self._watcher.start()
            if cfg.schedule is not None:  # every="auto": after the restore (its first byte waits for nothing)
                self._policy = self._auto_open(cfg.schedule, store=store, fence=fence)
            self._open = True
        except BaseException:
            self._teardown()
            raise

    def _after_upload(self, step: int, nbytes: int, seconds: float) -> None:
        """Syncer thread: learn the upload rate; drop local checkpoints that were kept only
        because they were still uploading."""
        self._planner.record_upload(nbytes, seconds)
        self._auto_durable(step, local_commit=False)
        if self._engine is not None:
            self._engine.retention()


def _call(ref: weakref.WeakMethod, *args: Any) -> None:
    method = ref()
    if method is not None:
        method(*args)
