"""Free-form files in the local dir are mirrored once stable and not open for writing."""
from __future__ import annotations

import time
from pathlib import Path

from spotckpt._local import LocalDir
from spotckpt._store import RemoteStore
from spotckpt._syncer import Syncer


def wait_for(pred, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_stable_closed_files_are_mirrored_open_ones_wait(tmp_path: Path, remote_url: str) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(remote_url)
    s = Syncer(LocalDir(root), store, keep_last=2, scan_interval=0.1, stable_seconds=0.3)
    s.start()
    try:
        (root / "sub").mkdir()
        (root / "sub" / "model-epoch1.pt").write_bytes(b"a" * 1000)
        writer = open(root / "checkpoint.pth", "wb")
        writer.write(b"partial")
        writer.flush()
        assert wait_for(lambda: "sub/model-epoch1.pt" in store.find())
        time.sleep(1.0)  # long past stable_seconds, but still open for writing
        assert "checkpoint.pth" not in store.find()
        writer.write(b" and the rest")
        writer.close()
        assert wait_for(lambda: store.find().get("checkpoint.pth") == len(b"partial and the rest"))
        # an unchanged tree causes no new uploads (flush first: the object is visible on the
        # remote a moment before the Syncer has counted its bytes)
        assert s.flush(10)
        n = s.bytes_uploaded
        time.sleep(0.6)
        assert s.bytes_uploaded == n
        # a rewrite is uploaded again; flush() does not wait for stability
        (root / "checkpoint.pth").write_bytes(b"v2")
        assert s.flush(10)
        assert store.cat("checkpoint.pth") == b"v2"
        # internal and in-flight files never leave the machine
        (root / ".x.tmp.sagemaker-ignore").mkdir()
        (root / ".x.tmp.sagemaker-ignore" / "f").write_bytes(b"x")
        assert s.flush(10)
        assert all(".sagemaker-ignore" not in k for k in store.find())
    finally:
        s.close(5)
