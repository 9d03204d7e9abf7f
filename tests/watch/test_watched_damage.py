"""Damage in the watched dir's remote state is quarantined, never deleted, and reported
honestly (issue 26, items 11, 12, 14).

- A file set that does not parse is refused (an older one is restored, if any), moved aside as
  ``files/SET-<n>.json.quarantined`` with its bytes, and every object it may name stays.
- ``spotckpt verify`` exits 1 for it, as for a step manifest damaged the same way.
- The mirror deletes only keys of the shapes it writes under ``files/`` and names the others
  in a warning.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import spotckpt
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore
from spotckpt._watch._fileset import newest_set, set_key
from spotckpt._watch._pull import restore_files
from spotckpt._watch._watcher import Watcher
from spotckpt.cli._main import main


def _two_sets(tmp_path: Path, store: RemoteStore) -> tuple[int, set[str]]:
    """Set 1 (a.pt v1), then the newest set (a.pt v2 and b.pt): returns its number and the
    object keys it names."""
    root = tmp_path / "first"
    root.mkdir()
    w = Watcher(LocalDir(root, state=tmp_path / "first-state"), store)
    (root / "a.pt").write_bytes(b"a v1")
    w.run_pass()
    (root / "a.pt").write_bytes(b"a v2, only in the newest set")
    (root / "b.pt").write_bytes(b"b, only in the newest set")
    w.run_pass()
    fs = newest_set(store)
    assert fs is not None and fs.seq == 2
    return fs.seq, {e.key for e in fs.entries.values()}


def _lose_a_byte(store: RemoteStore, seq: int) -> bytes:
    raw = store.cat(set_key(seq))
    damaged = raw[:-1]  # the closing brace lost: the set no longer parses
    store.put_bytes(set_key(seq), damaged)
    return damaged


# -- 11: a damaged newest set is quarantined with what it names ------------------------------
def test_a_damaged_newest_set_is_quarantined_and_its_objects_kept(tmp_path: Path, remote_url: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(remote_url)
    seq, named = _two_sets(tmp_path, store)
    damaged = _lose_a_byte(store, seq)
    new = tmp_path / "new"
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        with spotckpt.Checkpointer({"n": 0}, local_dir=new, remote=remote_url) as ck:
            # refused (right): the newest set was the only one, its predecessor is long gone
            assert not (new / "a.pt").exists() and not (new / "b.pt").exists()
            (new / "c.pt").write_bytes(b"written after the start")
            assert ck.flush(60)
    keys = set(RemoteStore(remote_url).list_keys("files/"))
    assert named <= keys, f"objects only the damaged set named were deleted: {sorted(named - keys)}"
    assert set_key(seq) not in keys
    assert store.cat(set_key(seq) + ".quarantined") == damaged
    assert "quarantined" in caplog.text and set_key(seq) in caplog.text
    fs = newest_set(store)
    assert fs is not None and fs.seq > seq and set(fs.entries) == {"c.pt"}
    # the next start sees the same: the quarantined set and its objects stay
    Watcher(LocalDir(new, state=tmp_path / "later-state"), store).run_pass()
    assert named <= set(store.list_keys("files/"))


def test_a_pull_quarantines_a_damaged_newest_set(tmp_path: Path, remote_url: str) -> None:
    store = RemoteStore(remote_url)
    seq, named = _two_sets(tmp_path, store)
    damaged = _lose_a_byte(store, seq)
    new = tmp_path / "new"
    new.mkdir()
    fs, got, _ = restore_files(LocalDir(new, state=tmp_path / "s"), store)
    assert fs is None and got == []
    assert store.cat(set_key(seq) + ".quarantined") == damaged
    assert named <= set(store.list_keys("files/"))


# -- 12: verify's verdict on a damaged newest set ----------------------------------------------
@pytest.mark.slow
def test_verify_exits_1_when_the_newest_set_does_not_parse(tmp_path: Path, remote_url: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    store = RemoteStore(remote_url)
    seq, _ = _two_sets(tmp_path, store)
    where = ["--local-dir", str(tmp_path / "none"), "--remote", remote_url]
    assert main(["verify", *where]) == 0
    capsys.readouterr()
    _lose_a_byte(store, seq)
    assert main(["verify", *where, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    bad = [r for r in doc["checked"] if not r["ok"]]
    assert bad and set_key(seq) in bad[0]["error"], doc
    assert main(["verify", *where]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and set_key(seq) in out
    assert store.cat(set_key(seq))  # verify only reads: nothing was moved


# -- 14: the mirror deletes only what it can have written --------------------------------------
FOREIGN = ["files/data.csv", "files/notes/readme.txt", "files/fedcba9876543210", "files/ABCDEF0123456789/x",
           "files/SET-1.json", "files/SET-000000000009.json.bak"]


def test_the_mirror_deletes_only_keys_it_can_have_written(tmp_path: Path, remote_url: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(remote_url)
    for k in FOREIGN:
        store.put_data(k, b"the user's own object")
    leftover = "files/0123456789abcdef/model.pt"  # a killed run's upload: ours, named by no set
    store.put_data(leftover, b"torn")
    root = tmp_path / "ck"
    root.mkdir()
    (root / "a.pt").write_bytes(b"a")
    with caplog.at_level(logging.WARNING, logger="spotckpt"):
        Watcher(LocalDir(root, state=tmp_path / "s"), store).run_pass()
    keys = set(store.list_keys("files/"))
    assert set(FOREIGN) <= keys, sorted(set(FOREIGN) - keys)
    assert leftover not in keys
    assert "files/data.csv" in caplog.text and f"{len(FOREIGN)} object(s)" in caplog.text
