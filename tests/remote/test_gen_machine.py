"""The generation protocol as a state machine (issue 26): several instances of one job
start (or are killed right after their claim), save, stall after their check, resume,
delete, commit file sets and die in any order against one remote, while foreign objects,
damaged claim bodies and hand-planted claims appear under ``gen/``.

``hypothesis.stateful`` on the real stores of ``remote_url`` (file://, moto, RGW), at the
level the Checkpointer, the Syncer and ``spotckpt run`` commit and delete through: ``claim``
and one ``Fence`` per instance. After every step: the number a start claims is the one the
model predicts (first free above the newest claim, never above MAX_GEN; none left: refused);
a stale instance's save, file set or delete raises and changes nothing committed; a fresh
restore takes the newest generation's newest step, never goes back, and verifies; foreign
objects are untouched; ``gen/`` stays a few claims; every start's record is recoverable.
"Stall" is the window the design accepts: a commit whose check passed before a newer claim
landed, completed later. ``SPOTCKPT_GEN_MACHINE_EXAMPLES=N``: N examples per store.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings, stateful as hs, strategies as st
from test_gen_prefix import legacy_body

import spotckpt
from spotckpt._commit._manifest import MANIFEST, FileEntry, build_manifest, hasher, step_dirname
from spotckpt._errors import RemoteError
from spotckpt._remote import _gens
from spotckpt._remote._fence import MAX_GEN, claim, generation_of, order, payload_dir
from spotckpt._remote._store import RemoteStore

_COUNTER = itertools.count()
STATS: Counter[str] = Counter()  # what the examples did, for the figure line
_FAST: dict[str, Any] = {}
EXAMPLES = {"file": 40, "s3": 12, "rgw": 12}
STEPS = {"file": 30, "s3": 20, "rgw": 16}

JUNK_BODIES = [b"", b"stray", b"\xff\xfe\x00", b"{}", b"[1, 2]", b'{"started": "yesterday"}', b"[" * 5000 + b"]" * 5000,
               b'{"format": "spotckpt-gen/1", "generation": -1, "started": 1.0}', b'{"format": "x", "started": 1.0}']


def refused(fn: Any, *args: Any) -> None:
    """``fn(*args)`` by a stale instance: refused."""
    with pytest.raises(spotckpt.StaleGenerationError):
        fn(*args)
    STATS["stale writes refused"] += 1


class Killed(BaseException):  # a start killed between its claim and its prune
    pass


@dataclass
class Inst:
    fence: Any  # a Fence (None: a start refused)
    gen: int
    step: int
    alive: bool = True
    pending: tuple[int, bytes] | None = None  # a stalled commit: its check passed


class GenerationMachine(hs.RuleBasedStateMachine):
    base: str = ""  # set by the test: a remote URL, or a dir for file://
    instances = hs.Bundle("instances")

    def __init__(self) -> None:
        super().__init__()
        n = next(_COUNTER)
        self.remote = f"file://{self.base}/m{n}/" if not self.base.startswith("s3://") else f"{self.base}m{n}/"
        self.store = RemoteStore(self.remote)
        if self.store.fast is not None:  # one S3 client for every example (the same bucket)
            self.store.fast = _FAST.setdefault(self.base, self.store.fast)
        self.claims: list[int] = []       # every generation whose key was created, in order
        self.forged: set[int] = set()     # claim records planted by hand (they count)
        self.junk: dict[str, bytes] = {}  # foreign objects: rel -> body (never touched)
        self.committed: dict[int, tuple[int, bytes]] = {}  # step -> (generation, payload)
        self.sets: dict[int, int] = {}    # file-set number -> generation
        self.best: tuple[int, int] | None = None
        self.killed = self._recoverable_checked = 0
        self.dirty: set[str] = set()  # what rules touched since the checks last ran
        self.damaged: set[int] = set()  # claims whose body was damaged (foreign since)
        self.live: list[Inst] = []  # instances started (the rules on the newest pick from them)

    # -- the model -----------------------------------------------------------------------
    def newest(self) -> int:
        return max([*self.claims, *self.forged], default=0)

    def numbers_held(self) -> set[int]:
        return {_gens.number(rel[4:]) for rel in self.junk if _gens.number(rel[4:]) is not None} \
            | set(self.claims) | self.forged

    def expected_claim(self) -> int | None:
        held, g = self.numbers_held(), self.newest() + 1
        while g in held:
            g += 1
        return g if g <= MAX_GEN else None

    def stale(self, inst: Inst) -> bool:
        return inst.gen < self.newest()

    def choice(self) -> tuple[int, int] | None:
        return max(((g, s) for s, (g, _) in self.committed.items()), default=None)

    # -- rules: starts ---------------------------------------------------------------------
    def new_store(self) -> RemoteStore:
        """A store as a new process has (its own Fence), with this machine's S3 client."""
        store = RemoteStore(self.remote)
        store.fast = self.store.fast or store.fast
        return store

    @hs.initialize(target=instances)
    def first_start(self) -> Inst:
        return self.start(False)

    @hs.initialize(target=instances)
    def second_start(self) -> Inst:
        """Two instances from the first step on: the older one is a zombie at once."""
        return self.start(False)

    @hs.rule(target=instances, killed=st.sampled_from([False, False, False, True]))
    def start(self, killed: bool) -> Inst:
        """A start; ``killed``: SIGKILLed right after its claim was made (before its prune)."""
        want = self.expected_claim()
        self.dirty.add("gen")
        if want is None:
            with pytest.raises(RemoteError, match="no generation left"):
                claim(self.new_store())
            STATS["start refused: no number left"] += 1
            return Inst(None, 0, 0, alive=False)
        if killed:
            with mock.patch.object(_gens, "delete", side_effect=Killed), pytest.raises(Killed):
                claim(self.new_store())
            self.claims.append(want)
            self.killed += 1
            STATS["starts killed before the prune"] += 1
            return Inst(None, want, 0, alive=False)
        fence = claim(self.new_store())
        assert fence.generation == want, (fence.generation, want, self.claims, self.forged)
        self.claims.append(want)
        STATS["starts"] += 1
        inst = Inst(fence, want, self.best[1] if self.best else 0)
        self.live.append(inst)
        return inst

    # -- rules: what instances do ----------------------------------------------------------
    def newest_live(self) -> Inst | None:
        live = [i for i in self.live if i.alive]
        return max(live, key=lambda i: i.gen) if live else None

    @hs.rule(inst=instances, data=st.binary(min_size=1, max_size=64))
    def save(self, inst: Inst, data: bytes) -> None:
        if not inst.alive:
            return
        inst.step += 1
        self.commit(inst, inst.step, data, check=True)

    @hs.precondition(lambda self: self.newest_live() is not None)
    @hs.rule(data=st.binary(min_size=1, max_size=64))
    def save_newest(self, data: bytes) -> None:
        self.save(self.newest_live(), data)

    @hs.precondition(lambda self: self.newest_live() is not None)
    @hs.rule(data=st.binary(min_size=1, max_size=64), older=st.booleans())
    def stall(self, data: bytes, older: bool) -> None:
        """A commit's check passes, the rest waits (a paused VM): the newest instance, or another."""
        live = [i for i in self.live if i.alive and i.pending is None]
        inst = (live[0] if older else self.newest_live()) if live else None
        if inst is None or inst.pending is not None:
            return
        if self.stale(inst):
            return refused(inst.fence.check, "commit")
        inst.fence.check("commit")
        STATS["stalls"] += 1
        inst.step, inst.pending = inst.step + 1, (inst.step + 1, data)

    @hs.precondition(lambda self: self.newest_live() is not None)
    @hs.rule(target=instances, data=st.binary(min_size=1, max_size=64))
    def stall_then_replaced(self, data: bytes) -> Inst:
        """The newest instance pauses after its check, and a replacement starts meanwhile."""
        self.stall(data, False)
        return self.start(False)

    @hs.precondition(lambda self: any(i.alive and i.pending for i in self.live))
    @hs.rule(which=st.integers(0, 3))
    def resume(self, which: int) -> None:
        waiting = [i for i in self.live if i.alive and i.pending]
        inst = waiting[which % len(waiting)]
        (step, data), inst.pending = inst.pending, None
        self.commit(inst, step, data, check=False)

    @hs.rule(inst=instances)
    def retention(self, inst: Inst) -> None:
        """Delete the oldest committed checkpoint that is not what a restore takes."""
        if not inst.alive:
            return
        old = sorted(s for s in self.committed if (self.committed[s][0], s) != self.choice())
        if not old:
            return
        s, g = old[0], self.committed[old[0]][0]
        rels = [f"{step_dirname(s)}/{MANIFEST}", f"{payload_dir(s, g)}/state.bin"]
        self.dirty.add("steps")
        if self.stale(inst):
            return refused(inst.fence.rm_many, rels, "retention's deletes")
        inst.fence.rm_many(rels, "retention's deletes")
        STATS["deletes"] += 1
        del self.committed[s]

    @hs.rule(inst=instances)
    def file_set(self, inst: Inst) -> None:
        if not inst.alive:
            return
        seq = max(self.sets, default=0) + 1
        self.dirty.add("sets")

        def make(n: int) -> bytes:
            return json.dumps({"seq": n, "generation": inst.gen}).encode()
        if self.stale(inst):
            return refused(inst.fence.commit_set, seq, make, lambda b: json.loads(b)["generation"], set_key)
        STATS["file sets"] += 1
        assert inst.fence.commit_set(seq, make, lambda b: json.loads(b)["generation"], set_key) == seq
        self.sets[seq] = inst.gen

    @hs.rule(inst=instances)
    def die(self, inst: Inst) -> None:
        inst.alive, inst.pending = False, None

    # -- rules: what else a bucket comes to hold --------------------------------------------
    @hs.rule(which=st.integers(0, 8), how=st.sampled_from(["truncate", "flip", "empty", "renumber"]))
    def damage(self, which: int, how: str) -> None:
        """A claim below the newest is damaged: it stops counting, kept like anything foreign."""
        keys = set(self.claim_keys())
        below = sorted(n for n in self.claims if n < self.newest() and _gens.gen_key(n) in keys)
        if not below:
            return
        data = self.store.cat(rel := _gens.gen_key(n := below[which % len(below)]))
        bad = {"truncate": data[: len(data) // 2], "flip": bytes([data[0] ^ 0x20]) + data[1:], "empty": b"",
               "renumber": data.replace(b'"generation": %d' % n, b'"generation": %d' % (n + 1))}[how]
        if _gens.parse(bad, n) is not None:
            return  # (a legacy body has no number to change)
        self.store.put_bytes(rel, bad)
        self.junk[rel] = bad
        self.damaged.add(n)
        self.dirty.add("gen")
        STATS["claims damaged"] += 1

    @hs.rule(what=st.sampled_from(["junk"] * 6 + ["forge"] * 2 + ["forge-max"]),
          where=st.sampled_from(["max", "near-max", "above", "below", "13-digit", "suffix", "name"]),
          body=st.sampled_from(JUNK_BODIES), k=st.integers(0, 3))
    def bucket(self, what: str, where: str, body: bytes, k: int) -> None:
        """An object appears under gen/: foreign, or a claim record planted by hand (it counts)."""
        if what == "junk":
            self.junk_key(where, body, k)
            return
        g = MAX_GEN if what == "forge-max" else self.newest() + 1 + k
        if g > MAX_GEN or g in self.numbers_held() or _gens.gen_key(g) in self.junk:
            return
        self.store.put_bytes(_gens.gen_key(g), legacy_body(g))
        self.dirty.add("gen")
        self.forged.add(g)
        STATS["forged claims"] += 1

    def junk_key(self, where: str, body: bytes, k: int) -> None:
        top = self.newest()
        name = {"max": f"{MAX_GEN - k:012d}", "near-max": f"{MAX_GEN - 10 - k:012d}",
                "above": f"{top + 1 + k:012d}", "below": f"{max(top - k, 0):012d}",
                "13-digit": f"{10**12 + k:013d}", "suffix": f"{max(top - 1, 0):012d}{['.old', 'x', '~', '/a'][k]}",
                "name": ["HISTORY", "latest", ".keep", "zz"][k]}[where]
        rel = f"gen/{name}"
        if rel in self.junk or _gens.number(name) in self.numbers_held() or len(name) > 12 and where == "above":
            return  # never over a claim (a claim overwritten by hand stops counting: not modelled)
        if any(k.startswith(rel + "/") or rel.startswith(k + "/") for k in [*self.junk, *self.claim_keys()]):
            return  # a file and a dir of one name: not on file://
        self.store.put_bytes(rel, body)
        self.dirty.add("gen")
        self.junk[rel] = body
        STATS["foreign objects"] += 1

    # -- the checks ------------------------------------------------------------------------
    def commit(self, inst: Inst, step: int, data: bytes, *, check: bool) -> None:
        self.dirty.add("steps")
        d = payload_dir(step, inst.gen)
        self.store.put_bytes(f"{d}/state.bin", data)  # the payload: this generation's own keys
        h = hasher()
        h.update(data)
        m = build_manifest(step, [FileEntry("state.bin", len(data), h.hexdigest())], framework="t", serializer="p")
        other = self.committed.get(step)
        stopped = (check and self.stale(inst)) or (other is not None and other[0] > inst.gen)
        if not check:
            inst.fence.check = lambda what: None  # the check already passed, before the newer claim
        try:
            if stopped:
                before = self.committed_keys()
                refused(inst.fence.commit_manifest, f"{step_dirname(step)}/{MANIFEST}", m)
                assert self.committed_keys() == before  # a stale instance changed nothing committed
                return
            inst.fence.commit_manifest(f"{step_dirname(step)}/{MANIFEST}", m)
        finally:
            inst.fence.__dict__.pop("check", None)
        self.committed[step] = (inst.gen, data)
        STATS["commits" if check else "late commits (stalled)"] += 1
        if check is False and self.stale(inst):
            STATS["late commits of a stale generation"] += 1

    def committed_keys(self) -> dict[int, bytes]:
        return {s: self.store.cat(f"{step_dirname(s)}/{MANIFEST}") for s in self.store.committed()}

    def claim_keys(self) -> list[str]:
        return [f"gen/{o.name}" for o in _gens.listing(self.store) if _gens.number(o.name) is not None
                and f"gen/{o.name}" not in self.junk]

    @hs.invariant()
    def restore_takes_the_newest_and_never_goes_back(self) -> None:
        if "steps" not in self.dirty:
            return  # (only rules that wrote, or tried to, can change it: checked after each)
        self.dirty.discard("steps")
        choice = self.choice()
        if self.best is not None:
            assert choice is not None and choice >= self.best, (choice, self.best)
        self.best = choice
        store = self.store  # no Fence: order() takes no shortcut
        steps = store.committed()
        assert sorted(steps) == sorted(self.committed)
        if not steps:
            return
        first = order(store, steps, store.read_manifest)[0]
        m = store.read_manifest(first)
        assert (generation_of(m), first) == choice
        assert store.cat(f"{payload_dir(first, generation_of(m))}/state.bin") == self.committed[first][1]

    @hs.invariant()
    def gen_holds_a_few_claims_and_every_foreign_object(self) -> None:
        if "gen" not in self.dirty:
            return
        self.dirty.discard("gen")
        objs = {f"gen/{o.name}": o for o in _gens.listing(self.store)}
        keys = set(self.store.list_keys("gen/"))  # (with keys below a "dir" on file://)
        for rel, body in self.junk.items():
            assert rel in keys and (rel not in objs or objs[rel].size == len(body)), rel
        ours = [rel for rel in objs if _gens.number(rel[4:]) in set(self.claims) - self.damaged]
        assert len(ours) <= 9 + self.killed, ours
        assert not self.newest() or _gens.gen_key(self.newest()) in objs  # the newest claim stays

    @hs.invariant()
    def every_start_is_recoverable(self) -> None:
        if len(self.claims) == self._recoverable_checked:
            return  # (the bodies change only with a start)
        self._recoverable_checked = len(self.claims)
        recs = {}
        for rel in self.claim_keys():
            n = _gens.number(rel[4:])
            r = _gens.parse(self.store.cat(rel), n)
            if r is not None:
                recs[n] = r
        known = {e[0] for e in _gens.history(recs)}
        assert set(self.claims) - self.damaged <= known, sorted(set(self.claims) - self.damaged - known)

    @hs.invariant()
    def file_sets_come_from_the_newest_writers(self) -> None:
        if "sets" not in self.dirty:
            return
        self.dirty.discard("sets")
        gens = [self.sets[s] for s in sorted(self.sets)]
        assert gens == sorted(gens), gens
        keys = sorted(k for k in self.store.list_keys("files/") if k.startswith("files/SET-"))
        assert keys == [set_key(n) for n in sorted(self.sets)], keys
        if keys:
            assert json.loads(self.store.cat(keys[-1]))["generation"] == gens[-1]


def set_key(n: int) -> str:
    return f"files/SET-{n:012d}.json"


def kind(remote_url: str) -> str:
    return "file" if remote_url.startswith("file://") else \
        "rgw" if "rgw" in os.environ.get("PYTEST_CURRENT_TEST", "") else "s3"


@pytest.mark.slow
def test_generation_protocol_state_machine(remote_url: str, tmp_path: Path, figure) -> None:
    k = kind(remote_url)
    GenerationMachine.base = str(tmp_path) if k == "file" else remote_url
    n = int(os.environ.get("SPOTCKPT_GEN_MACHINE_EXAMPLES") or EXAMPLES[k])
    STATS.clear()
    t0 = time.monotonic()
    hs.run_state_machine_as_test(GenerationMachine, settings=settings(
        max_examples=n, stateful_step_count=STEPS[k], deadline=None, derandomize=True,
        suppress_health_check=list(HealthCheck), print_blob=False))
    figure(f"[gen-machine] {k}: {n} examples of up to {STEPS[k]} steps in {time.monotonic() - t0:.1f} s: "
           + ", ".join(f"{v} {name}" for name, v in sorted(STATS.items())))
    assert STATS["stale writes refused"] and STATS["starts"] and STATS["commits"], STATS
    if k == "file":
        assert STATS["late commits of a stale generation"] and STATS["starts killed before the prune"], STATS
