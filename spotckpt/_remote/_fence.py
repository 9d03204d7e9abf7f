"""Generations: one writer per job on a shared remote (split-brain fencing).

Sync layer (no ML imports). Spot platforms do start a replacement while the old instance
still runs, and orchestrators launch a job twice. Each start of a writer (a Checkpointer,
``spotckpt run``) *claims a generation*: it creates ``gen/<G:012d>`` under the lineage's
prefix with the storage's atomic create (S3 ``PUT`` with ``If-None-Match: *``, which S3,
MinIO and RGW refuse with 412 when the key exists; ``link()`` of a complete temp file on
``file://``, which fails when the name exists), G = the newest claim + 1 (the next free
number on a refusal). Two starts can never hold one generation, whatever the clocks say.
What counts as a claim, and how ``gen/`` stays small: :mod:`._gens`.

Then, per generation G:

- what a commit uploads goes to keys no other generation writes: a checkpoint's payload
  under ``step-N/`` for G <= 1 (the layout from before generations) and ``step-N/g-<G>/``
  above; file-set objects have random version ids anyway;
- before a commit becomes visible (the manifest, a file set) and before a delete, the writer
  lists ``gen/`` after its own key (one small request; every page, so no foreign key hides a
  newer claim): a newer claim there means this instance is stale, and it stops with
  :class:`StaleGenerationError` instead;
- the manifest records G (``extra.generation``), is created conditionally, and only a newer
  generation replaces an older one's manifest of the same step; restore takes the newest
  generation with a committed checkpoint, then its newest step (:func:`order`).

A remote written before generations is generation 0. A store without an atomic create
(other fsspec protocols, or a server that ignores ``If-None-Match``: detected at the claim
by creating the same key again) gets one warning line and runs unfenced.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Callable, Iterable

from spotckpt._commit import Manifest, parse_step_dirname, step_dirname
from spotckpt._errors import CorruptCheckpointError, RemoteError, StaleGenerationError
from spotckpt._events import redact

from . import _gens
from ._gens import GEN_DIR, MAX_GEN, gen_key  # noqa: F401 - re-exported
from ._store import RemoteStore

log = logging.getLogger("spotckpt")

_PRECONDITION = {"PreconditionFailed", "412"}
_CONFLICT = {"ConditionalRequestConflict", "409"}  # S3: a concurrent conditional write; retried


def payload_dir(step: int, generation: int) -> str:
    """The remote dir of a checkpoint's payload: ``step-N`` for generations 0 and 1 (the
    layout from before generations, so one start writes what it always wrote),
    ``step-N/g-<G>`` above, so two generations never write the same key."""
    d = step_dirname(step)
    return d if generation <= 1 else f"{d}/g-{generation:012d}"


def generation_of(m: Manifest) -> int:
    """The generation a manifest records (0: written before generations).

    Raises:
        CorruptCheckpointError: not a whole number in ``0..MAX_GEN`` (untrusted input).
    """
    g = m.extra.get("generation", 0) if isinstance(m.extra, dict) else 0
    if type(g) is not int or not 0 <= g <= MAX_GEN:
        raise CorruptCheckpointError(f"spotckpt: manifest of step {m.step} names a bad generation {g!r}")
    return g


def with_generation(m: Manifest, g: int) -> Manifest:
    return m if not g else dataclasses.replace(m, extra={**m.extra, "generation": g})


def _code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return ""
    err = resp.get("Error") or {}
    return str(err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")


def create(store: RemoteStore, rel: str, data: bytes) -> bool | None:
    """Create object ``rel`` unless it exists: True if created, False if it existed (or a
    retry found the first attempt's object), None if this store has no atomic create."""
    if store.is_local:
        path = store.path(rel)

        def local() -> bool:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp.sagemaker-ignore"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, fails if the name exists; readers see it whole
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        return store._call(f"write of {rel}", local)
    fast = store.fast
    if fast is None:
        return None

    def s3() -> bool:
        try:
            fast.client.put_object(Bucket=fast.bucket, Key=store._key(rel), Body=data, IfNoneMatch="*")
            return True
        except Exception as e:  # noqa: BLE001 - a refusal is an answer, the rest is retried
            if _code(e) in _PRECONDITION:
                return False
            from ._s3fast import translate

            t = translate(e)
            if t is e:
                raise
            raise t from e
    return store._call(f"write of {rel}", s3)


class Fence:
    """This instance's generation of the lineage at ``store``.

    Example:
        >>> fence = claim(store)  # doctest: +SKIP
        >>> fence.commit_manifest("step-000000000100/MANIFEST.json", manifest)
    """

    def __init__(self, store: RemoteStore, generation: int, *, enforced: bool = True,
                 previous: int | None = None, foreign: dict[str, str] | None = None) -> None:
        self.store, self.generation, self.enforced = store, generation, enforced
        # the newest generation claimed before this one (None: unknown, e.g. on other ranks)
        self.previous = generation - 1 if previous is None else previous
        store.fence = self  # type: ignore[attr-defined]  # restore's order() reads it
        self.checks = 0  # listings made to prove this generation is the newest (bench, tests)
        # numbered keys under gen/ whose bodies are not claims (name -> tag): not read again
        self.foreign = dict(foreign or {})

    def newer(self) -> int | None:
        """The newest generation claimed after this one, or None: one listing after the own
        key (every page: no key, foreign or not, hides what follows it); a body is read only
        for a numbered key above this generation not known foreign (a newer claim, usually:
        then this instance is stale; a body that cannot be read counts as a claim)."""
        self.checks += 1
        objs = _gens.listing(self.store, after=_gens.gen_name(self.generation))
        above = [o for n, o in _gens.numbered(objs) if n > self.generation and self.foreign.get(o.name) != o.tag]
        for o, r in zip(above, _gens.read_many(self.store, above, until=lambda r: r is not None)):
            if r is None:
                self.foreign[o.name] = o.tag
            else:  # a claim, unreadable, or deleted since the listing (pruned by a newer claim)
                return _gens.number(o.name)
        return None

    def check(self, what: str) -> None:
        """Raises :class:`StaleGenerationError` if a newer generation was claimed."""
        g = self.newer()
        if g is not None:
            raise self.stale(g, what)

    def stale(self, newer: int, what: str) -> StaleGenerationError:
        return StaleGenerationError(
            f"spotckpt: {redact(self.store.url)}: this instance holds generation {self.generation} of the "
            f"job and generation {newer} started since (a replacement or a second launch of the same "
            f"job); stopped before the {what}, nothing newer was overwritten or deleted. Let the newest "
            "instance run (or stop it and start this one again: a start claims a newer generation)")

    def commit_manifest(self, rel: str, m: Manifest) -> None:
        """Make manifest ``m`` (stamped with this generation) visible at ``rel``, proving first
        that this generation is the newest; another generation's manifest there is replaced
        only if it is older."""
        m = with_generation(m, self.generation)
        data = m.to_json()
        self.check(f"commit of step {m.step}")
        made = create(self.store, rel, data)
        if made is None:  # no atomic create: fenced by the check only
            self.store.put_bytes(rel, data)
            return
        if not made:
            try:
                other = generation_of(Manifest.from_json(self.store.cat(rel)))
            except (CorruptCheckpointError, RemoteError):
                other = 0  # damaged, or gone meanwhile: ours replaces it
            if other > self.generation:
                raise self.stale(other, f"commit of step {m.step}")
            self.store.put_bytes(rel, data)  # an older generation's (or our own retried) commit
            return
        self.store.streams.written(rel)  # as put_bytes does
        from ._checkpoints import _manifest_step

        step = _manifest_step(rel)
        if step is not None and self.store.newest_listed is not None:
            self.store.newest_listed = max(self.store.newest_listed, step)

    def commit_set(self, seq: int, make: Callable[[int], bytes], generation_of_set: Callable[[bytes], int],
                   key: Callable[[int], str]) -> int:
        """Create file set ``seq`` (``make(seq)``), or the next free number above an older
        generation's set of that number. Returns the number used."""
        self.check("commit of a file set")
        for _ in range(64):
            data = make(seq)
            made = create(self.store, key(seq), data)
            if made is None:
                self.store.put_data(key(seq), data)
                return seq
            if made:
                return seq
            try:
                other = generation_of_set(self.store.cat(key(seq)))
            except (CorruptCheckpointError, RemoteError):
                other = 0
            if other > self.generation:
                raise self.stale(other, "commit of a file set")
            seq += 1
        raise RemoteError(f"spotckpt: remote {redact(self.store.url)}: no free file-set number after {seq}")

    def rm_many(self, rels: list[str], what: str = "delete") -> None:
        """Delete ``rels`` once this generation is proven the newest (nothing: no request)."""
        if rels:
            self.check(what)
            self.store.rm_many(rels)


def claim(store: RemoteStore) -> Fence:
    """Claim the next generation of the lineage at ``store``: a listing of ``gen/``, the body
    of the newest claim, one conditional create (more only if another start took the number
    meanwhile), and on S3 one more create of the same key, which must be refused (a server
    that accepts it does not enforce conditional writes). Every :data:`._gens.PRUNE_MIN` th
    start also reads the claims below the newest :data:`._gens.KEEP` before it creates its
    own (their records go into its history) and deletes them after: ``gen/`` stays a few
    keys, whatever the job's restart count.

    Raises:
        RemoteError: no number is left (a claim record at ``gen/999999999999``), or the
            store refused a thousand creates in a row.
    """
    sv = _gens.survey(store)
    hist = _gens.history(sv.records)
    g = _next(sv.top, sv.taken)
    for _ in range(1000):
        if g > MAX_GEN:
            raise _exhausted(store, sv)
        data = _gens.body(g, hist, sv.foreign)
        made = create(store, gen_key(g), data)
        if made is None:
            store.put_bytes(gen_key(g), data)
            _warn_unfenced(store, "has no atomic create")
            break
        if made:
            break
        g = _next(g, sv.taken)
    else:
        raise RemoteError(f"spotckpt: remote {redact(store.url)}: could not claim a generation")
    enforced = made is not None
    if made and not store.is_local and create(store, gen_key(g), data):
        _warn_unfenced(store, "ignores If-None-Match (conditional PUT)")
        enforced = False
    _prune(store, sv)
    return Fence(store, g, enforced=enforced, previous=sv.previous(g), foreign=sv.foreign)


def _next(g: int, taken: set[int]) -> int:
    """The first number above ``g`` that no key under ``gen/`` holds."""
    g += 1
    while g in taken:
        g += 1
    return g


def _exhausted(store: RemoteStore, sv: _gens.Survey) -> RemoteError:
    return RemoteError(
        f"spotckpt: remote {redact(store.url)}: no generation left to claim: {gen_key(sv.top)} holds a "
        f"claim and no number above it is free (the highest there can be is {MAX_GEN}). A job's starts "
        "count up by one, so it was put there by another tool or by hand: remove it (and any gen/ key "
        "far above the others) and start again; the checkpoints are untouched")


def _prune(store: RemoteStore, sv: _gens.Survey) -> None:
    """Delete the claims the new one's history now holds, and name what is foreign."""
    try:
        _gens.delete(store, sv.doomed)
    except RemoteError as e:  # the next prune deletes them
        log.info("spotckpt: remote %s: old generation claims not pruned: %s", redact(store.url), e)
    foreign = sorted(_gens.foreign_names(sv.objs) + list(sv.foreign))
    if foreign:
        log.warning("spotckpt: remote %s: %d object(s) under gen/ are not generation claims of spotckpt "
                    "(%s%s): skipped and left in place", redact(store.url), len(foreign),
                    ", ".join(f"gen/{n}" for n in foreign[:3]), ", ..." if len(foreign) > 3 else "")


def _warn_unfenced(store: RemoteStore, why: str) -> None:
    log.warning("spotckpt: remote %s %s: two instances of this job at once (a replacement while "
                "the old one still runs) could overwrite each other's checkpoints; run one at a time",
                redact(store.url), why)


def order(store: RemoteStore, steps: Iterable[int], read: Callable[[int], Manifest]) -> list[int]:
    """Committed ``steps`` in the order a restore tries them: newest generation first, then
    newest step (a manifest that cannot be read first, so that it is quarantined as before).

    Cheap: when this start's claim saw at most generation 1 before it, every manifest is of
    generation 0 or 1 and the steps decide alone. Otherwise one listing of ``step-*/`` bounds
    each step's generation by the ``g-<G>/`` dirs in it, and manifests are read newest bound
    first until no unread step can beat the best one found (usually one read, which the
    restore needed anyway)."""
    steps = sorted(steps, reverse=True)
    fence = getattr(store, "fence", None)
    if len(steps) < 2 or (fence is not None and fence.previous <= 1):
        return steps
    bound: dict[int, int] = {}
    for rel in store.step_objects():
        parts = rel.split("/")
        if len(parts) > 2 and parts[1].startswith("g-") and parts[1][2:].isdigit():
            s = parse_step_dirname(parts[0])
            if s is not None:
                bound[s] = max(bound.get(s, 1), int(parts[1][2:]))
    todo = sorted(steps, key=lambda s: (bound.get(s, 1), s), reverse=True)
    known: list[tuple[float, int]] = []
    for i, s in enumerate(todo):
        if known and (bound.get(s, 1), s) < max(known):
            return [s for _, s in sorted(known, reverse=True)] + todo[i:]
        try:
            known.append((float(generation_of(read(s))), s))
        except (CorruptCheckpointError, RemoteError):
            known.append((float("inf"), s))
    return [s for _, s in sorted(known, reverse=True)]
