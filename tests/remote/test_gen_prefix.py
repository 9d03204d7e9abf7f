"""The ``gen/`` prefix against what a bucket may hold (issue 26, items 6-8).

Generations (``spotckpt/_remote/_fence.py``) live as keys ``gen/<G:012d>``. These tests put
what a real bucket may come to hold there (a stray key at the top of the numbers, keys that
sort between the claims, thousands of claims from a long job) and check that the numbers
stay monotonic and within range, that the stale check sees every newer claim, and that a
start's cost does not grow with the job's restart count. Real stores: ``file://``, moto and
RGW (``remote_url``).
"""
from __future__ import annotations

import json
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


def claims(remote: str | RemoteStore) -> list[str]:
    return [k for k in gen_names(remote) if len(k) == 12 and k.isdigit()]


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


def test_a_zombie_behind_a_foreign_key_is_stopped_and_the_replacement_restored(remote_url: str,
                                                                            tmp_path: Path) -> None:
    """Item 8 end to end through the Syncer: the zombie's next commit and its retention
    (keep_last=1, which would delete the replacement's checkpoints) are refused, and a fresh
    start restores the replacement's state."""
    old, old_sync, old_fence = _writer(tmp_path, "old", remote_url)
    plant(remote_url, {f"gen/{old_fence.generation:012d}.old": b"a copy someone kept"})
    _commit(old, 1, b"old 1")
    assert old_sync.flush(30)
    new, new_sync, new_fence = _writer(tmp_path, "new", remote_url, keep_last=2)
    for s in (2, 3):
        _commit(new, s, b"new %d" % s)
    assert new_sync.flush(30)
    _commit(old, 10, b"old 10")
    assert not old_sync.flush(30)
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
