"""The watched dir's restore side against a hostile or changing remote (issue 11, review).

Each test is a regression test for one finding: a set that cannot be read for a transient
reason fails the pull (never an older set), the torn first save of a killed run is set
aside with no set yet, any legal name restores, hostile set content is refused (never a
crash), restored symlinks never resolve outside the dir, and a pull that races the job's
next commit restarts with the newer set (never a mix of two).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotckpt.cli import _inspect as _cli_inspect
from spotckpt._errors import RemoteError, RemoteNotFoundError
from spotckpt._watch._fileset import Entry, FileSet, newest_set, set_key
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import hasher
from spotckpt._remote._store import RemoteStore
from spotckpt._watch._watcher import Watcher
from spotckpt._watch._pull import restore_files
from spotckpt.cli._main import main


def _h(b: bytes) -> str:
    x = hasher()
    x.update(b)
    return x.hexdigest()


def _put_set(store: RemoteStore, entries: list[dict], objects: dict[str, bytes] | None = None) -> None:
    for k, v in (objects or {}).items():
        store.put_data(k, v)
    store.put_data(set_key(1), json.dumps({"format": "spotckpt-files/1", "seq": 1, "entries": entries}).encode())


def _two_sets(tmp_path: Path, url: str) -> Path:
    root = tmp_path / "ck"
    root.mkdir()
    w = Watcher(LocalDir(root, state=tmp_path / "s1"), RemoteStore(url))
    (root / "model.pt").write_bytes(b"epoch 1")
    w.run_pass()
    (root / "model.pt").write_bytes(b"epoch 2, newer")
    w.run_pass()
    return root


# -- 3: a set that cannot be read now is not a corrupt set ---------------------------------
def test_unreadable_newest_set_fails_the_pull(tmp_path: Path, remote_url: str) -> None:
    _two_sets(tmp_path, remote_url)

    class Flaky(RemoteStore):  # the newest set's GET keeps timing out
        def cat(self, rel: str) -> bytes:
            if rel.endswith("SET-000000000002.json"):
                raise RemoteError("spotckpt: remote: read of files/SET-000000000002.json failed after 6 attempts: timeout")
            return super().cat(rel)

    new = tmp_path / "ck2"
    new.mkdir()
    with pytest.raises(RemoteError):
        restore_files(LocalDir(new, state=tmp_path / "s2"), Flaky(remote_url))
    assert list(new.iterdir()) == []


def test_a_set_that_vanished_while_read_means_list_again(tmp_path: Path, remote_url: str) -> None:
    _two_sets(tmp_path, remote_url)

    class Gone(RemoteStore):  # the newest set was superseded (and deleted) between list and read
        n = 0

        def cat(self, rel: str) -> bytes:
            if rel.endswith("SET-000000000002.json") and Gone.n == 0:
                Gone.n += 1
                raise RemoteNotFoundError("spotckpt: remote: read failed: gone")
            return super().cat(rel)

    assert newest_set(Gone(remote_url)).seq == 2


def test_run_exits_with_one_line_when_the_set_cannot_be_read(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'remote'}/"
    _two_sets(tmp_path, url)
    code = ("import sys\nfrom spotckpt._remote import _store\nfrom spotckpt._errors import RemoteError\n"
            "orig = _store.RemoteStore.cat\n"
            "def cat(self, rel):\n"
            "    if rel.endswith('SET-000000000002.json'):\n"
            "        raise RemoteError('spotckpt: remote: read of files/SET-000000000002.json failed after 6 attempts: timeout')\n"
            "    return orig(self, rel)\n"
            "_store.RemoteStore.cat = cat\n"
            "from spotckpt.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    marker = tmp_path / "started"
    p = subprocess.run([sys.executable, "-c", code, "run", "--remote", url, "--local-dir", str(tmp_path / "ck3"),
                        "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0, p.stderr
    assert not marker.exists()  # the script never started from scratch
    assert "Traceback" not in p.stderr and "SET-000000000002.json" in p.stderr, p.stderr
    assert newest_set(RemoteStore(url)).seq == 2


# -- 4: no committed set yet: a torn first save is still set aside --------------------------
def test_torn_first_save_is_set_aside_when_the_remote_has_no_set(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    local = LocalDir(root, state=tmp_path / "state")
    store = RemoteStore(remote_url)
    Watcher(local, store, interval=0.5).beat()  # a watcher ran here and was killed (no clean beat)
    (root / "checkpoint.pth").write_bytes(b"half")  # written after its last beat: may be torn
    fs, got, _ = restore_files(local, store)
    assert fs is None and got == []
    assert not (root / "checkpoint.pth").exists()
    assert [p.read_bytes() for p in (local.meta / "suspect").rglob("checkpoint.pth")] == [b"half"]


# -- 6: any legal name restores; a file that cannot be written here is refused alone ---------
def test_a_240_char_name_restores(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    name = ("epoch=12-step=4000-" + "val_loss=0.1234-" * 15)[:240] + ".ckpt"
    (root / name).write_bytes(b"weights")
    (root / "other.pt").write_bytes(b"other")
    Watcher(LocalDir(root, state=tmp_path / "s1"), RemoteStore(remote_url)).run_pass()
    new = tmp_path / "ck2"
    new.mkdir()
    _, got, _ = restore_files(LocalDir(new, state=tmp_path / "s2"), RemoteStore(remote_url))
    assert sorted(got) == sorted([name, "other.pt"])
    assert (new / name).read_bytes() == b"weights"


def test_an_unwritable_entry_is_refused_alone(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(remote_url)
    _put_set(store, [{"path": "d/" + "n" * 300, "size": 3, "xxh3": _h(b"abc"), "mtime_ns": 1, "key": "files/v1/a"},
                     {"path": "e/" + "n" * 300 + "/f", "size": 3, "xxh3": _h(b"abc"), "mtime_ns": 1, "key": "files/v1/a"},
                     {"path": "ok.bin", "size": 3, "xxh3": _h(b"abc"), "mtime_ns": 1, "key": "files/v1/a"}],
             {"files/v1/a": b"abc"})
    _, got, _ = restore_files(LocalDir(root, state=tmp_path / "s"), store)
    assert got == ["ok.bin"]
    assert sorted(p.name for p in root.iterdir()) == ["ok.bin"]  # no temp file, no dir left


# -- 8: hostile set content is an invalid set, never a crash --------------------------------
@pytest.mark.parametrize("entry", [
    {"path": "a.bin", "size": 3, "xxh3": _h(b"abc"), "mtime_ns": 10**30, "key": "files/v1/a"},
    {"path": "a.bin", "size": 3, "xxh3": _h(b"abc"), "mtime_ns": -2**63 - 1, "key": "files/v1/a"},
    {"path": "l", "link": "a" * 5000},
], ids=["huge-mtime", "huge-negative-mtime", "long-link"])
def test_hostile_entry_makes_the_set_invalid(tmp_path: Path, entry: dict) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(f"file://{tmp_path / 'remote'}/")
    _put_set(store, [entry], {"files/v1/a": b"abc"})
    assert newest_set(store) is None
    assert restore_files(LocalDir(root, state=tmp_path / "s"), store) == (None, [], 0)


def test_a_link_that_cannot_be_created_is_refused_alone(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(f"file://{tmp_path / 'remote'}/")
    _put_set(store, [{"path": "d", "size": 3, "xxh3": _h(b"abc"), "mtime_ns": 1, "key": "files/v1/a"},
                     {"path": "d/l", "link": "x"}, {"path": "m", "link": "d"}], {"files/v1/a": b"abc"})
    _, got, _ = restore_files(LocalDir(root, state=tmp_path / "s"), store)
    assert sorted(got) == ["d", "m"]


# -- 9: restored links never resolve outside the dir ----------------------------------------
def test_restored_links_never_resolve_outside(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("outside the local dir")
    store = RemoteStore(remote_url)
    store.put_data("files/v1/f", b"abc")
    fs = FileSet(seq=1, entries={
        "here": Entry(path="here", link="."),
        "esc": Entry(path="esc", link="here/../secret.txt"),
        "sub2/f": Entry(path="sub2/f", size=3, xxh3=_h(b"abc"), mtime_ns=1, key="files/v1/f"),
        "sub/up": Entry(path="sub/up", link="../sub2"),
        "esc2": Entry(path="esc2", link="sub/up/../../secret.txt"),
        "fine": Entry(path="fine", link="sub/up/f"),
    })
    store.put_data(set_key(1), fs.to_json())
    _, got, _ = restore_files(LocalDir(root, state=tmp_path / "s"), store)
    real_root = root.resolve()
    for p in root.rglob("*"):
        if p.is_symlink():
            assert real_root in Path(os.path.realpath(p)).parents, (p, os.readlink(p))
    assert "here" not in got and "esc2" not in got and not os.path.lexists(root / "esc2")
    assert (root / "fine").read_bytes() == b"abc"


# -- 10: a pull racing the job's next commit restarts with the newer set --------------------
def _racing(tmp_path: Path, url: str) -> tuple[Path, Watcher]:
    root = tmp_path / "ck"
    root.mkdir()
    w = Watcher(LocalDir(root, state=tmp_path / "s1"), RemoteStore(url))
    for n in ("a.pt", "b.pt"):
        (root / n).write_bytes(n.encode() * 100)
    w.run_pass()
    return root, w


def test_pull_racing_a_commit_restores_the_newer_set_whole(tmp_path: Path, remote_url: str) -> None:
    root, w = _racing(tmp_path, remote_url)

    class Reader(RemoteStore):
        n = 0

        def get_file(self, rel: str, local: str | os.PathLike[str]) -> None:
            super().get_file(rel, local)
            Reader.n += 1
            if Reader.n == 1:  # the first file of set 1 is here; the job commits set 2 now
                for m in ("a.pt", "b.pt"):
                    (root / m).write_bytes(b"new " + m.encode() * 100)
                w.run_pass()

    other = tmp_path / "eval"
    other.mkdir()
    fs, got, _ = restore_files(LocalDir(other, state=tmp_path / "s2"), Reader(remote_url, attempts=2, base_delay=0.01))
    assert fs is not None and fs.seq == 2 and sorted(got) == ["a.pt", "b.pt"]
    for m in ("a.pt", "b.pt"):  # both from set 2: never a mix of two sets
        assert (other / m).read_bytes() == b"new " + m.encode() * 100
    assert sorted(p.name for p in other.iterdir()) == ["a.pt", "b.pt"]


def test_an_object_missing_from_the_newest_set_is_refused_alone(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'remote'}/"
    _, w = _racing(tmp_path, url)
    store = RemoteStore(url)
    store.rm_many([newest_set(store).entries["a.pt"].key])
    other = tmp_path / "eval"
    other.mkdir()
    _, got, _ = restore_files(LocalDir(other, state=tmp_path / "s2"), store)
    assert got == ["b.pt"]


def test_verify_racing_a_commit_checks_the_newer_set(tmp_path: Path, remote_url: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    root, w = _racing(tmp_path, remote_url)
    calls = []

    def racing_newest(store: RemoteStore, *a: object, **kw: object) -> FileSet | None:
        fs = newest_set(store, *a, **kw)
        if not calls:  # verify has read set 1; the job commits set 2 (and deletes set 1's objects)
            (root / "a.pt").write_bytes(b"newer")
            (root / "b.pt").write_bytes(b"newer too")
            w.run_pass()
        calls.append(fs.seq)
        return fs

    monkeypatch.setattr(_cli_inspect, "newest_set", racing_newest)
    rc = main(["verify", "--remote", remote_url, "--local-dir", str(tmp_path / "v"), "--remote-only"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "DAMAGED" not in out and calls == [1, 2]
