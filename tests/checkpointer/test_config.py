"""Every bad setting fails when the Checkpointer starts, before any training step."""
from __future__ import annotations

from pathlib import Path

import pytest

import spotckpt
from spotckpt._config import Config


def _run(tmp_path: Path, **kw) -> list[int]:
    ran: list[int] = []
    kw.setdefault("local_dir", tmp_path / "ck")
    with spotckpt.Checkpointer({"x": 1}, **kw) as ckpt:
        for step in ckpt.steps(3):
            ran.append(step)
    return ran


@pytest.mark.parametrize("kw, err, words", [
    ({"remote": "htp://bucket/x/"}, spotckpt.ConfigError, "unknown URL scheme"),
    ({"remote": "bucket/prefix"}, spotckpt.ConfigError, "not a URL"),
    ({"remote": "s3:///prefix/"}, spotckpt.ConfigError, "no bucket"),
    ({"every_steps": -5}, spotckpt.ConfigError, "every_steps"),
    ({"every_steps": 0}, spotckpt.ConfigError, "every_steps"),
    ({"every_seconds": -1.0}, spotckpt.ConfigError, "every_seconds"),
    ({"keep_last": 0}, spotckpt.ConfigError, "keep_last"),
    ({"grace_seconds": "soon"}, spotckpt.ConfigError, "grace_seconds"),
    ({"signals": ("SIGNOPE",)}, spotckpt.ConfigError, "unknown signal"),
])
def test_bad_values(tmp_path: Path, kw, err, words) -> None:
    ran: list[int] = []
    with pytest.raises(err) as ei:
        ran = _run(tmp_path, **kw)
    assert ran == []
    assert isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert words in msg and "\n" not in msg and msg.startswith("spotckpt:")


def test_unwritable_local_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")
    with pytest.raises(spotckpt.LocalDirError) as ei:
        _run(tmp_path, local_dir=blocker / "ck")
    assert isinstance(ei.value, PermissionError)
    assert "local_dir" in str(ei.value) and "SPOTCKPT_LOCAL_DIR" in str(ei.value)


def test_unknown_bucket(tmp_path: Path, s3_env) -> None:
    with pytest.raises(spotckpt.RemoteError) as ei:
        _run(tmp_path, remote="s3://no-such-bucket-spotckpt-test/run/")
    assert isinstance(ei.value, FileNotFoundError)
    assert "no-such-bucket-spotckpt-test" in str(ei.value) and "bucket" in str(ei.value)


@pytest.mark.slow
def test_unreachable_endpoint(tmp_path: Path, monkeypatch) -> None:
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(spotckpt.RemoteError) as ei:
        _run(tmp_path, remote="s3://b/p/")
    assert "s3://b/p/" in str(ei.value) and "\n" not in str(ei.value)


def test_env_then_args_then_defaults(tmp_path: Path) -> None:
    env = {"SPOTCKPT_LOCAL_DIR": str(tmp_path / "env"), "SPOTCKPT_KEEP_LAST": "5",
           "SPOTCKPT_EVERY_STEPS": "7", "SPOTCKPT_REMOTE": "file:///tmp/r"}
    c = Config.resolve(env=env)
    assert (c.local_dir, c.keep_last, c.every_steps, c.remote) == (tmp_path / "env", 5, 7, "file:///tmp/r/")
    c = Config.resolve(env=env, keep_last=1, local_dir=tmp_path / "arg", remote=None)
    assert (c.local_dir, c.keep_last, c.remote) == (tmp_path / "arg", 1, None)
    assert Config.resolve(env={}, local_dir=tmp_path).grace_seconds == 30
    assert Config.resolve(env={"SM_CURRENT_HOST": "algo-1"}, local_dir=tmp_path).grace_seconds == 120
    assert str(Config.resolve(env={}, check_local=False).local_dir) == "/opt/ml/checkpoints"


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(spotckpt.ConfigError, match="SPOTCKPT_EVERY_SECONDS"):
        Config.resolve(env={"SPOTCKPT_EVERY_SECONDS": "ten"}, local_dir=tmp_path)


def test_local_dir_created_by_another_process_meanwhile_is_accepted(tmp_path: Path) -> None:
    """Ranks of one job start at once on the same local dir: one creates it while another
    checks it. The check must not call a dir that appeared between its two looks "not a
    directory" (seen in a 2-rank torchrun start: rank 1 died with LocalDirError)."""
    import threading

    from spotckpt._config import probe_local_dir

    errors: list[BaseException] = []
    for i in range(150):
        path = tmp_path / f"d{i}" / "ckpt"
        go = threading.Barrier(8)

        def start() -> None:
            go.wait()
            try:
                probe_local_dir(path)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
