"""`spotckpt ls | status | verify | pull | push`, --json, --help and bad input, against S3."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_env
from proc_helpers import run, spotckpt
from spotckpt import Checkpointer
from spotckpt._commit._local import STEP_MARKER
from spotckpt._commit._manifest import step_dirname
from spotckpt._remote._store import RemoteStore


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run(spotckpt(*args), env=env or run_env())


def _json(*args: str) -> dict:
    r = _cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _make_local(local: Path) -> None:
    """Two committed checkpoints (steps 10, 20) and a free-form file, not yet uploaded."""
    state = {"w": list(range(1000))}
    with Checkpointer(state, local_dir=local, remote=None, every_steps=10, keep_last=5) as ck:
        for _ in ck.steps(total=20):
            pass
    (local / "notes.txt").write_text("free-form file written by user code\n")


@pytest.mark.slow
def test_ls_status_push_pull_verify_roundtrip(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "a"
    _make_local(local)
    where = ["--local-dir", str(local), "--remote", s3_remote]

    ls = _json("ls", *where)
    assert [(c["step"], c["local"], c["durable"]) for c in ls["checkpoints"]] == [(20, True, False), (10, True, False)]
    assert ls["files"] == [{"path": "notes.txt", "bytes": 36, "local": True, "remote": False, "durable": False}]
    st = _json("status", *where)
    assert st["durable_step"] is None and st["newest_local_step"] == 20
    assert st["not_durable_bytes"] > 36 and st["not_durable_files"] == ["notes.txt"]
    assert st["not_durable_seconds"] >= 0

    push = _json("push", *where)
    assert push["ok"] and push["durable_step"] == 20
    ls = _json("ls", *where)
    assert ls["checkpoints"][0] == {**ls["checkpoints"][0], "step": 20, "remote": True, "durable": True}
    assert ls["files"][0]["durable"] is True
    st = _json("status", *where)
    assert st["durable_step"] == 20 and st["not_durable_bytes"] == 0 and st["not_durable_seconds"] == 0
    assert st["upload_bytes_per_second"] and st["uploads_measured"] >= 1
    text = _cli("status", *where).stdout
    assert "last durable step:    20" in text and "upload throughput" in text

    fresh = tmp_path / "b"                          # a new machine: empty dir
    pulled = _json("pull", "--local-dir", str(fresh), "--remote", s3_remote)
    assert pulled["step"] == 20 and pulled["step_source"] == "remote" and pulled["files"] == ["notes.txt"]
    assert (fresh / "notes.txt").read_text() == (local / "notes.txt").read_text()
    assert _cli("verify", "--local-dir", str(fresh), "--remote", s3_remote).returncode == 0


def test_verify_finds_damage_local_and_remote(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "a"
    _make_local(local)
    where = ["--local-dir", str(local), "--remote", s3_remote]
    assert _cli("push", *where).returncode == 0
    assert _cli("verify", *where).returncode == 0

    store = RemoteStore(s3_remote)
    rel = f"{step_dirname(20)}/" + next(p.name for p in (local / step_dirname(20)).iterdir()
                                          if p.name not in ("MANIFEST.json", STEP_MARKER))
    data = bytearray(store.cat(rel))
    data[len(data) // 2] ^= 0xFF                    # same size, one flipped byte
    store.put_bytes(rel, bytes(data))
    r = _cli("verify", *where, "--remote-only")
    assert r.returncode == 1 and "DAMAGED" in r.stdout and "checksum" in r.stdout
    assert _cli("verify", *where, "--remote-only", "--quick").returncode == 0   # sizes only: by design

    f = local / rel
    f.write_bytes(f.read_bytes()[:-1])
    doc = json.loads(_cli("verify", *where, "--local-only", "--json").stdout)
    assert doc["ok"] is False
    assert [(c["where"], c["step"], c["ok"]) for c in doc["checked"]] == [("local", 10, True), ("local", 20, False)]


def _on_a_terminal(argv: list[str], env: dict) -> tuple[int, str]:
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    p.wait(60)
    os.close(master)
    return p.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal(tmp_path: Path, s3_remote: str) -> None:
    local = tmp_path / "a"
    local.mkdir()
    (local / "big.bin").write_bytes(os.urandom(12_000_000))
    env = run_env()
    rc, tty = _on_a_terminal(spotckpt("push", "--local-dir", str(local), "--remote", s3_remote), env)
    assert rc == 0, tty
    assert "push [" in tty and "100%" in tty and "12.0 MB" in tty
    fresh = tmp_path / "b"
    rc, tty = _on_a_terminal(spotckpt("pull", "--local-dir", str(fresh), "--remote", s3_remote), env)
    assert rc == 0 and "pull [" in tty and "100%" in tty, tty
    r = _cli("pull", "--local-dir", str(tmp_path / "c"), "--remote", s3_remote)  # not a terminal
    assert r.returncode == 0 and "[" not in r.stderr


def test_help_teaches() -> None:
    top = _cli("--help").stdout
    for word in ("run", "spot", "ls", "status", "verify", "pull", "push", "SPOTCKPT_REMOTE", "examples:"):
        assert word in top
    r = _cli("run", "--help").stdout
    assert "SPOTCKPT_SUPERVISED=1" in r and "deadline" in r and "PID 1" in r
    s = _cli("spot", "--help").stdout
    for word in ("MaxWaitTimeExceeded", "--interrupt-at", "--max-wait", "savings", "Exit status 0 only"):
        assert word in s


@pytest.mark.parametrize("argv, needle", [
    (["ls", "--bogus"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
    (["run", "--", "no-such-command-xyz"], "command not found"),
    (["run"], "no command given"),
    (["spot", "--max-run", "10", "--max-wait", "5", "--", "true"], "must be larger than --max-run"),
])
def test_bad_input_one_line_exit_2(tmp_path: Path, argv: list[str], needle: str) -> None:
    r = _cli(*argv, env=run_env(SPOTCKPT_LOCAL_DIR=str(tmp_path / "ck")))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


@pytest.mark.slow
def test_unreachable_remote_is_one_line_exit_2(tmp_path: Path, s3_env: dict) -> None:
    env = run_env(AWS_ENDPOINT_URL_S3="http://127.0.0.1:9")
    for cmd in ("ls", "status", "push"):
        t0 = time.monotonic()
        r = _cli(cmd, "--local-dir", str(tmp_path), "--remote", "s3://bucket/p/", env=env)
        assert r.returncode == 2, (cmd, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "s3://bucket/p/" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 25


# -- issue 14 item 5: missing remotes, bad local dirs, numeric options, --json on errors ----
def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """The CLI in this process (the same main() as the subprocess; no interpreter start-up
    per case): exit status, stdout, stderr."""
    from spotckpt.cli._main import main

    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_exit_2(rc: int, out: str, err: str, needle: str) -> None:
    assert rc == 2, (rc, out, err)
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err


def test_read_only_commands_on_a_missing_bucket_exit_2(tmp_path: Path, s3_remote: str,
                                                      capsys: pytest.CaptureFixture) -> None:
    missing = "s3://spotckpt-no-such-bucket-" + s3_remote.split("/")[2][-12:] + "/run/"
    for cmd in ("ls", "status", "verify", "pull"):
        rc, out, err = _main(capsys, cmd, "--local-dir", str(tmp_path / "ck"), "--remote", missing)
        _one_line_exit_2(rc, out, err, "does not exist")
        assert missing in err and out == ""
    for cmd in ("verify", "pull"):                  # (ls and status: test_ls_status_push_pull_verify_roundtrip)
        # an existing bucket with nothing under the prefix is a valid empty remote
        rc, out, err = _main(capsys, cmd, "--local-dir", str(tmp_path / "ck"), "--remote", s3_remote)
        assert rc == 0, err
    r = _cli("ls", "--local-dir", str(tmp_path / "ck"), "--remote", missing)   # and as a process
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "does not exist" in r.stderr


def test_read_only_commands_on_a_missing_file_remote_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    for cmd in ("ls", "status", "verify", "pull"):
        rc, out, err = _main(capsys, cmd, "--local-dir", str(tmp_path / "ck"), "--remote", f"file://{tmp_path / 'nowhere'}/")
        _one_line_exit_2(rc, out, err, "does not exist")
        # an existing empty dir is an empty remote
        rc, out, err = _main(capsys, cmd, "--local-dir", str(tmp_path / "ck"), "--remote", f"file://{tmp_path / 'empty'}/")
        assert rc == 0, err


def test_local_dir_that_is_a_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "remote").mkdir()
    (tmp_path / "afile").write_text("x")
    remote = f"file://{tmp_path / 'remote'}/"
    for cmd in ("ls", "status", "verify", "pull", "push"):
        for local in (tmp_path / "afile", tmp_path / "afile" / "sub"):
            rc, out, err = _main(capsys, cmd, "--local-dir", str(local), "--remote", remote)
            _one_line_exit_2(rc, out, err, "is a file" if local.name == "sub" else "is not a directory")
    for cmd in ("run", "spot"):
        extra = ["--workdir", str(tmp_path / "wd")] if cmd == "spot" else []
        rc, out, err = _main(capsys, cmd, "--local-dir", str(tmp_path / "afile"), "--remote", remote,
                             *extra, "--", "true")
        _one_line_exit_2(rc, out, err, "is not a directory")
    rc, out, err = _main(capsys, "spot", "--workdir", str(tmp_path / "afile"), "--", "true")
    _one_line_exit_2(rc, out, err, "--workdir")
    r = _cli("verify", "--local-dir", str(tmp_path / "afile"), "--remote", remote)   # not 1 ("damage")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a directory" in r.stderr, r.stderr


def test_push_from_a_missing_dir_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "remote").mkdir()
    r = _cli("push", "--json", "--local-dir", str(tmp_path / "nope"), "--remote", f"file://{tmp_path / 'remote'}/")
    _one_line_exit_2(r.returncode, r.stdout, r.stderr, "does not exist")
    assert not (tmp_path / "nope").exists()         # it used to be created, and "pushed 0 B"
    doc = json.loads(r.stdout)                      # --json: the error is a JSON document too
    assert doc["ok"] is False and "does not exist" in doc["error"] and doc["exit_status"] == 2


def test_json_errors_are_one_json_document(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    remote = f"file://{tmp_path / 'afile' / 'remote'}/"   # cannot exist, cannot be made
    for cmd in ("ls", "status", "verify", "pull", "push"):
        rc, out, err = _main(capsys, cmd, "--json", "--local-dir", str(tmp_path / "ck"), "--remote", remote)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        doc = json.loads(out)                       # stdout is exactly one JSON document
        assert doc == {"ok": False, "error": err.strip(), "exit_status": 2}


def test_json_usage_errors_are_one_json_document(capsys: pytest.CaptureFixture) -> None:
    from spotckpt.cli._main import main

    for argv in (["push", "--json", "--bogus"], ["spot", "--json", "--grace", "-1", "--", "true"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        out, err = capsys.readouterr()
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert json.loads(out)["ok"] is False and json.loads(out)["exit_status"] == 2


@pytest.mark.parametrize("argv", [
    ["run", "--stable-seconds", "-1"], ["run", "--scan-interval", "-1"], ["run", "--scan-interval", "0"],
    ["run", "--scan-interval", "nan"], ["run", "--grace", "-5"], ["run", "--grace", "0"],
    ["run", "--grace", "inf"], ["run", "--keep-last", "0"], ["run", "--keep-last", "1.5"],
    ["spot", "--interrupt-rate", "-1"], ["spot", "--interrupt-rate", "nan"], ["spot", "--max-run", "0"],
    ["spot", "--max-run", "-3"], ["spot", "--max-wait", "nan"], ["spot", "--grace", "0"],
    ["spot", "--spot-discount", "1"], ["spot", "--spot-discount", "-0.1"], ["spot", "--scan-interval", "0"],
    ["spot", "--stable-seconds", "-1"], ["spot", "--interrupt-at", "5,-1"], ["spot", "--capacity-wait", "nan"],
])
def test_numeric_options_are_validated_by_argparse(tmp_path: Path, argv: list[str],
                                                   capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from spotckpt.cli._main import main

    monkeypatch.setenv("SPOTCKPT_LOCAL_DIR", str(tmp_path / "ck"))
    with pytest.raises(SystemExit) as e:            # in-process: argparse stops before anything runs
        main([*argv, "--workdir", str(tmp_path / "wd")] if argv[0] == "spot" else argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1 and "argument" in err and argv[1] in err, err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "wd").exists()


@pytest.mark.parametrize("fast", [True, False])
def test_open_remote_read_probe_refuses_a_missing_bucket(s3_remote: str, fast: bool) -> None:
    """With s3fs alone (no boto3 fast path: session settings it cannot reproduce), a listing
    of a missing bucket is empty; the read probe checks the bucket itself."""
    from spotckpt._errors import RemoteNotFoundError
    from spotckpt._sync._pull import open_remote

    opts = {} if fast else {"s3_additional_kwargs": {"ACL": "private"}}
    assert (RemoteStore(s3_remote, opts).fast is not None) is fast
    missing = "s3://spotckpt-no-such-bucket-" + s3_remote.split("/")[2][-12:] + "/run/"
    with pytest.raises(RemoteNotFoundError, match="bucket 'spotckpt-no-such-bucket-.*' does not exist"):
        open_remote(missing, opts, probe="read")
    assert open_remote(s3_remote, opts, probe="read").committed() == []   # empty, and fine
