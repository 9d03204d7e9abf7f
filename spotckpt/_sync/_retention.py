"""Remote retention of the Syncer: the checkpoints past ``keep_last`` deleted after a newer
commit is durable, and payload no manifest names. Sync layer, no ML imports.

A mixin of :class:`._syncer.Syncer` (which holds the state used here). What is under
``step-*/`` is listed once, at the first retention of a process, and then kept up to date
with what the process uploads and deletes (issue 25: a save lists nothing); rank 0 of a
multi-rank job lists every time (the other ranks upload their parts themselves).
"""
from __future__ import annotations

from spotckpt._commit import MANIFEST, parse_step_dirname, step_dirname
from spotckpt._errors import CorruptCheckpointError, RemoteError
from spotckpt._events import EventLog
from spotckpt._remote import Fence, RemoteStore, generation_of, payload_dir

from ._layout import SingleLayout, upload_dir


class Retention:
    """``_remote_retention`` and its bookkeeping, for the Syncer."""

    store: RemoteStore
    fence: Fence | None
    layout: SingleLayout
    keep_last: int
    events: EventLog
    _retention_due: int | None
    _known: dict[int, set[str]] | None
    _proven: bool

    def _know(self, step: int, *rels: str) -> None:
        if self._known is not None:
            self._known.setdefault(step, set()).update(rels)

    def _remote_retention(self, newest: int) -> None:
        """Un-commit the checkpoints past ``keep_last`` (all manifests in one request), then
        delete every other payload older than the newest in one more: a few
        requests whatever the backlog, so a process killed again and again soon after
        each upload still catches up (one delete after another, it fell behind by one
        checkpoint per kill). Payload without a manifest there was left by a process killed
        between payload and manifest upload, or between these two requests: it never was a
        checkpoint, and nothing else would ever remove it. Quarantined checkpoints stay.

        Above the newest step, and beside the checkpoints kept, payload may be this
        process's upload in flight, but then it is under this generation's dir: another
        (older: the fence check proves no newer one) generation's payload there was left by
        a killed process that had run ahead of the remote, and can never be committed now
        (:meth:`_stale_payload`)."""
        self._retention_due = newest
        # A superseded step's stream may still be sending: done first, so that its payload
        # is in the listing (a late one stayed on the remote after a run's last upload).
        proven, self._proven = self._proven, False
        for rel in self.store.streams.drop_before(newest) or []:
            s = parse_step_dirname(rel.split("/", 1)[0])
            if s is not None:
                self._know(s, rel)
        if self._known is None or type(self.layout) is not SingleLayout:
            known: dict[int, set[str]] = {}
            for rel in self.store.step_objects():
                s = parse_step_dirname(rel.split("/", 1)[0])
                if s is not None and "/" in rel:
                    known.setdefault(s, set()).add(rel)
            # other ranks upload their parts themselves: rank 0 lists them every time
            self._known = known if type(self.layout) is SingleLayout else None
        else:
            known = self._known
        by_step = {s: sorted(rels) for s, rels in known.items()}
        steps = sorted(s for s, rels in by_step.items() if f"{step_dirname(s)}/{MANIFEST}" in rels)
        keep = set(steps[-self.keep_last:]) | {newest}
        old = [s for s in steps if s not in keep and s < newest]
        doomed = {s: rels for s, rels in by_step.items() if s < newest and s not in keep
                  and f"{step_dirname(s)}/{MANIFEST}.quarantined" not in rels}
        stale = self._stale_payload(newest, {s: rels for s, rels in by_step.items() if s not in doomed})
        if self.fence is not None and (old or doomed or stale) and not proven:
            # never a newer generation's checkpoints; after a commit, its own check (made just
            # before its manifest PUT) proves it for the deletes that follow it
            self.fence.check("retention's deletes")
        self._known = None  # until the deletes are done (an error: list again next time)
        self.store.rm_many([f"{step_dirname(s)}/{MANIFEST}" for s in old])
        for s in old:
            self.events.emit("remote_deleted", step=s)
        self.store.rm_many([rel for s, rels in doomed.items() for rel in rels
                            if not (s in old and rel.endswith(f"/{MANIFEST}"))]
                           + [rel for rels in stale.values() for rel in rels])
        for s in sorted((set(doomed) - set(old)) | set(stale)):
            self.events.emit("remote_orphan_deleted", step=s)
        for s in doomed:
            known.pop(s, None)
        for s, rels in stale.items():
            known[s] = known.get(s, set()) - set(rels)
        for s in set(old) - set(doomed):
            known[s] = known.get(s, set()) - {f"{step_dirname(s)}/{MANIFEST}"}
        self._known = known if type(self.layout) is SingleLayout else None
        self._retention_due = None

    def _stale_payload(self, newest: int, by_step: dict[int, list[str]]) -> dict[int, list[str]]:
        """Of the step dirs retention keeps (``step -> objects``), the objects of another
        generation's upload that no manifest names: everything but this generation's
        ``g-<G>/`` dir and the manifest, unless the manifest is another generation's (read
        only where the dir holds two uploads). Nothing while this instance writes where
        generations 0 and 1 did (``step-N/`` itself, which it cannot tell apart)."""
        g = self.layout.generation
        if self.fence is None or g <= 1:
            return {}
        out: dict[int, list[str]] = {}
        for s, rels in by_step.items():
            d = step_dirname(s)
            if f"{d}/{MANIFEST}.quarantined" in rels:
                continue
            mine = f"{payload_dir(s, g)}/"
            theirs = [r for r in rels if not r.startswith(mine) and r != f"{d}/{MANIFEST}"]
            if not theirs:
                continue
            if f"{d}/{MANIFEST}" in rels and s != newest:  # (newest: ours, just committed)
                if len({upload_dir(r) for r in rels if r != f"{d}/{MANIFEST}"}) < 2:
                    continue  # one upload: the manifest's (the usual case: no request)
                try:
                    named = payload_dir(s, generation_of(self.store.read_manifest(s)))
                except (CorruptCheckpointError, RemoteError):
                    continue  # unreadable or gone: not ours to judge here
                if named != d:
                    theirs = [r for r in theirs if not r.startswith(f"{named}/")]
                else:  # generations 0 and 1: right in step-N/, beside the others' g-<G>/ dirs
                    theirs = [r for r in theirs if upload_dir(r) != d]
            if theirs:
                out[s] = theirs
        return out
