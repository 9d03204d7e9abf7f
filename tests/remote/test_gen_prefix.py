"""The ``gen/`` prefix against what a bucket may hold (issue 26, items 6-8).

Generations (``spotckpt/_remote/_fence.py``) live as keys ``gen/<G:012d>``. These tests put
what a real bucket may come to hold there (a stray key at the top of the numbers, keys that
sort between the claims, thousands of claims from a long job) and check that the numbers
stay monotonic and within range, that the stale check sees every newer claim, and that a
start's cost does not grow with the job's restart count. Real stores: ``file://``, moto and
RGW (``remote_url``).
"""
from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_fencing import _commit, _restored, _writer

import spotckpt
from spotckpt._remote._fence import MAX_GEN, claim
from spotckpt._remote._store import RemoteStore


def legacy_body(g: int) -> bytes:
    """A claim's body as spotckpt wrote it before issue 26 (no format, no number)."""
    return json.dumps({"host": "node-a", "pid": 1000 + g, "started": 1.7e9 + g}).encode()


def plant(remote: str, items: dict[str, bytes]) -> None:
    """Objects straight into the bucket (or dir), as another tool or an old version would
    leave them: ``{rel: body}``, many at once in parallel."""
    store = RemoteStore(remote)
    if store.is_local:
        for rel, data in items.items():
            p = Path(store.path(rel))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return
    fast = store.fast

    def put(kv: tuple[str, bytes]) -> None:
        fast.client.put_object(Bucket=fast.bucket, Key=store._key(kv[0]), Body=kv[1])
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, items.items()))


def gen_names(remote: str | RemoteStore) -> list[str]:
    store = RemoteStore(remote) if isinstance(remote, str) else remote
    return sorted(k[len("gen/"):] for k in store.list_keys("gen/"))


def claims_name(rel: str) -> bool:
    name = rel.rpartition("gen/")[2]
    return len(name) == 12 and name.isdigit()


def claims(remote: str | RemoteStore) -> list[str]:
    return [k for k in gen_names(remote) if claims_name(k)]


class Requests:
    """S3 requests one store sends (botocore's before-send on its client); 0 on file://."""

    def __init__(self, store: RemoteStore) -> None:
        self.n = self.puts = 0
        if store.fast is not None:
            store.fast.client.meta.events.register("before-send", self._count)

    def _count(self, request: object = None, **kw: object) -> None:
        self.n += 1
        self.puts += getattr(request, "method", "") == "PUT"


# -- item 6: a stray key at the top of the numbers ------------------------------------------
def test_a_stray_top_key_neither_ends_the_numbers_nor_blinds_the_check(remote_url: str) -> None:
    """A stray ``gen/999999999999`` made every later claim take a generation above the
    maximum (13 digits, which the stale check cannot see): the claims stay in range, keep
    counting up, and the older instance is stopped by the newer claim."""
    zero = claim(RemoteStore(remote_url))
    plant(remote_url, {"gen/999999999999": b"stray"})
    a = claim(RemoteStore(remote_url))
    b = claim(RemoteStore(remote_url))
    assert zero.generation < a.generation < b.generation <= MAX_GEN
    for older in (zero, a):
        with pytest.raises(spotckpt.StaleGenerationError, match=f"generation {b.generation} started"):
            older.check("commit")
    b.check("commit")  # the stray key is no newer generation: the newest instance goes on
    assert "999999999999" in gen_names(remote_url)  # not ours: kept


@pytest.mark.slow
def test_a_stray_top_key_does_not_make_the_job_restart_from_scratch(remote_url: str, tmp_path: Path) -> None:
    """The end of item 6 as a user meets it: each start's checkpoints were quarantined as
    "bad generation" by the next start, so every start trained from step 0."""
    plant(remote_url, {"gen/999999999999": b"stray"})
    restored = []
    for i in range(3):
        state = {"n": 0}
        with spotckpt.Checkpointer(state, local_dir=tmp_path / f"start{i}", remote=remote_url,
                                   every_steps=1) as ck:
            restored.append((ck.restored_step, state["n"]))
            for _ in ck.steps(total=3 * (i + 1)):
                state["n"] += 1
            assert ck.flush(60)
    assert restored == [(None, 0), (3, 3), (6, 6)]


# -- item 7: a long job's thousands of claims -----------------------------------------------
@pytest.mark.slow
def test_a_start_after_1100_claims_creates_once_and_prunes(remote_url: str) -> None:
    """The claim read ``gen/`` with one unpaginated listing (1,000 keys) and nothing pruned
    it: past 1,000 claims each start probed upward with refused creates (one per claim past
    1,000: 100 here), past 2,000 every start failed with "could not claim a generation".
    Now one create (and the refused re-create that checks the server, on S3), and the starts
    that follow prune the old claims, a bounded number each, until ``gen/`` is a few keys."""
    n = 1100
    plant(remote_url, {f"gen/{g:012d}": legacy_body(g) for g in range(1, n + 1)})
    store = RemoteStore(remote_url)
    sent = Requests(store)
    fences = [claim(store)]
    assert fences[0].generation == n + 1
    assert sent.puts <= 2, sent.puts
    while len(claims(store)) > 10:
        assert len(fences) <= 8, len(claims(store))  # a few hundred pruned per start
        fences.append(claim(store))
    assert [f.generation for f in fences] == list(range(n + 1, n + 1 + len(fences)))
    before = sent.n
    for _ in range(4):  # a prune every 4th start: 4 x (list, body, create, re-create) + 4 bodies + 1 delete
        fences.append(claim(store))
    if store.fast is not None:
        assert sent.n - before <= 21, sent.n - before
    with pytest.raises(spotckpt.StaleGenerationError):
        fences[0].check("commit")


# -- item 8: a foreign key right after the own claim ----------------------------------------
def test_a_foreign_key_after_the_own_claim_does_not_blind_the_check(remote_url: str) -> None:
    """The stale check listed one key after its own and dropped names it did not parse: a
    key such as ``gen/000000000001.old`` hid every newer claim from it."""
    a = claim(RemoteStore(remote_url))
    plant(remote_url, {f"gen/{a.generation:012d}.old": b"backup", f"gen/{a.generation:012d}x": b"",
                       "gen/0000000000019": legacy_body(19)})
    b = claim(RemoteStore(remote_url))
    with pytest.raises(spotckpt.StaleGenerationError, match=f"generation {b.generation} started"):
        a.check("commit")
    b.check("commit")


@pytest.mark.slow
def test_a_zombie_behind_a_foreign_key_is_stopped_and_the_replacement_restored(remote_url: str,
                                                                            tmp_path: Path) -> None:
    """Item 8 end to end through the Syncer: the zombie's next commit and its retention
    (keep_last=1, which would delete the replacement's checkpoints) are refused, and a fresh
    start restores the replacement's state."""
    old, old_sync, old_fence = _writer(tmp_path, "old", remote_url)
    plant(remote_url, {f"gen/{old_fence.generation:012d}.old": b"a copy someone kept"})
    _commit(old, 1, b"old 1")
    assert old_sync.flush(120)
    new, new_sync, new_fence = _writer(tmp_path, "new", remote_url, keep_last=2)
    for s in (2, 3):  # each flushed: the Syncer's queue of one would skip step 2 if 3 came first
        _commit(new, s, b"new %d" % s)
        assert new_sync.flush(120)
    _commit(old, 10, b"old 10")
    assert not old_sync.flush(120)
    assert isinstance(old_sync.stale, spotckpt.StaleGenerationError)
    assert RemoteStore(remote_url).committed() == [2, 3]
    assert _restored(remote_url, tmp_path / "fresh", start=True) == (3, b"new 3", new_fence.generation)
    old_sync.close(0)
    new_sync.close(5)


@pytest.mark.slow
def test_claim_cost_does_not_grow_with_restarts(remote_url: str) -> None:
    """200 starts one after the other: the last ones send no more requests than the first
    ones and leave ``gen/`` as small as it was (the figure at 5,000 starts:
    ``tests/scripts/gen_starts.py``)."""
    store = RemoteStore(remote_url)  # one client: a new one costs more than the claim itself
    sent = Requests(store)
    counts, sizes = [], []
    for _ in range(200 if store.is_local else 60):
        before = sent.n
        claim(store)
        counts.append(sent.n - before)
        sizes.append(len(gen_names(store)))
    assert max(sizes) <= 10, sizes
    if store.fast is not None:
        early, late = counts[8:28], counts[-20:]
        assert sum(late) <= sum(early), (early, late)


# -- the family: what else gen/ may hold ------------------------------------------------------
def hostile_gen(rng: random.Random, newest: int) -> dict[str, bytes]:
    """Over 1,001 foreign objects for ``gen/`` beside claims up to ``newest`` (generated,
    seeded): names that sort among and after the claims, numbers below and far above them
    (up to the last one there can be), bodies that are damaged claim records or anything."""
    record = legacy_body(newest)

    def damaged() -> bytes:
        return rng.choice([record[:rng.randrange(len(record))], b"", rng.randbytes(rng.randrange(1, 64)),
                           record.replace(b'"started"', b'"begun"'), b'{"format": "spotckpt-gen/2", "started": 1}',
                           bytes([record[0] ^ 0x01]) + record[1:], b"[" * 3000 + b"]" * 3000])
    out: dict[str, bytes] = {}
    while len(out) < 700:  # names that are no claim, sorting anywhere among the claims
        n = rng.randrange(0, newest + 20)
        out[rng.choice([f"{n:012d}.old", f"{n:012d}x", f"{n:013d}", f"{n:011d}", f"{n:012d}-copy",
                        f"backup/{n:012d}", f"{rng.randbytes(4).hex()}"])] = damaged()
    for n in rng.sample(range(1, newest - 10), 290):  # numbered, below the claims
        out[f"{n:012d}"] = damaged()
    for n in [MAX_GEN, MAX_GEN - 1, *rng.sample(range(newest + 100, MAX_GEN - 1), 10)]:  # and far above
        out[f"{n:012d}"] = damaged()
    return out


def intact(remote: str, items: dict[str, bytes]) -> list[str]:
    """Of the objects ``items`` (rel -> body), those changed or gone."""
    store = RemoteStore(remote)
    if store.is_local:
        return [rel for rel, body in items.items()
                if not Path(store.path(rel)).is_file() or Path(store.path(rel)).read_bytes() != body]
    fast, base = store.fast, store._key("x")[:-1]  # "run/"
    etags = {}
    for page in fast.client.get_paginator("list_objects_v2").paginate(Bucket=fast.bucket, Prefix=base):
        etags.update({o["Key"][len(base):]: o["ETag"].strip('"') for o in page.get("Contents", [])})
    return [rel for rel, body in items.items() if etags.get(rel) != hashlib.md5(body).hexdigest()]


@pytest.mark.slow
def test_over_a_thousand_foreign_objects_under_gen(remote_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Generated hostile content (seeded) beside a long job's last claims: 1,300 foreign
    objects under ``gen/``, numbered or not, damaged claim bodies, numbers up to the last
    one. None counts as a claim, none is deleted or changed, the stale check sees past all
    of them, and from the second start on a start costs a bounded number of requests (the
    numbered ones below the claims are read once, by a prune, and remembered)."""
    newest = 600
    plant(remote_url, {f"gen/{g:012d}": legacy_body(g) for g in range(newest - 5, newest + 1)})
    store = RemoteStore(remote_url)
    sent = Requests(store)
    running = claim(store)
    assert running.generation == newest + 1
    junk = {f"gen/{k}": v for k, v in hostile_gen(random.Random(26), newest).items()}
    assert len(junk) > 1000
    plant(remote_url, junk)
    running.check("commit")  # nothing foreign is a newer generation
    with caplog.at_level("WARNING", logger="spotckpt"):
        fences = [claim(store)]
    assert fences[0].generation == newest + 2
    lines = [r.getMessage() for r in caplog.records if "not generation claims" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines  # one line a start
    with pytest.raises(spotckpt.StaleGenerationError, match=f"generation {newest + 2} started"):
        running.check("commit")
    costs = []
    for _ in range(8):
        before = sent.n
        fences.append(claim(store))
        costs.append(sent.n - before)
    assert [f.generation for f in fences] == list(range(newest + 2, newest + 11))
    fences[-1].check("commit")
    if store.fast is not None:  # 2 pages, the 12 numbered ones above (read at each start: they
        # might be claims), the newest claim, create, re-create; every 4th start a prune (4 + 1).
        # Bodies are read 8 at a time: up to 7 more past the newest claim. The first two
        # starts read the 290 numbered ones below too (256 a start), once.
        assert max(costs[1:]) <= 2 + 12 + 1 + 2 + 5 + 7, costs
        assert costs[0] <= 2 + 12 + 1 + 2 + 5 + 7 + (290 - 256), costs
    assert len(claims(store)) - sum(1 for k in junk if claims_name(k)) <= 10
    assert intact(remote_url, junk) == []


def test_a_claim_body_always_reads_back_as_a_claim() -> None:
    """What a claim carries on from other bodies (history, foreign keys) is checked and
    capped: a body spotckpt writes is always a claim record under the size a reader accepts
    (one that was not would stop counting, and a start could claim below it)."""
    from spotckpt._remote import _gens

    hostile = {"started": 1.0, "host": "h" * 10_000, "pid": 1,
               "history": [[g, 1.5, "x" * 10_000, 7] for g in range(1, 5000)]
               + [[0, 1, "h", 1], ["7", 1, "h", 1], [8, float("nan"), "h", 1], [9, 1, None, 1], [10, 1, "h"], "x",
                  [11, 1, "h", 1, "x" * 300], [12, 1, "h", 1, {"a": 1}], [13, 1, "h", 1, 1, 2, 3, 4, 5]]}
    hist = _gens.history({5000: hostile, 4999: {"started": 2.0, "host": "b", "pid": 2, "history": "junk"}})
    assert len(hist) == _gens.HISTORY_CAP and hist[-1][0] == 5000 and all(len(e[2]) <= 255 for e in hist)
    later = _gens.history({3: {"started": 1.0, "host": "a", "pid": 1, "history": [[2, 0.5, "a", 1, "interrupted"]]}})
    assert later[0] == [2, 0.5, "a", 1, "interrupted"]  # a later version's fields are carried on
    foreign = {f"{n:012d}": "e" * 40 for n in range(5000)}
    data = _gens.body(5001, hist, foreign)
    assert len(data) < _gens.MAX_BODY
    rec = _gens.parse(data, 5001)
    assert rec is not None and _gens.parse(data, 5002) is None
    assert [e[0] for e in _gens.history({5001: rec})][-2:] == [5000, 5001]
