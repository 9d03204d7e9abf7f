"""How soon the watcher looks again after a pass that uploaded.

Idle passes are paced so that scanning a big tree costs at most half a percent of a core:
the interval is stretched to the pass's CPU time / 0.005. Measured over the whole pass, an
upload's CPU counted as scanning: after a 256 MiB file the next pass came seconds late, and
a file closed meanwhile waited for it (bench/ row 8: ~2 s between passes at
``--scan-interval 0.5``). Only the scan and comparison count now.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from spotckpt._watch._fileset import newest_set
from spotckpt._commit._local import LocalDir
from spotckpt._remote._store import RemoteStore
from spotckpt._sync._syncer import Syncer


def test_an_upload_does_not_stretch_the_interval_between_passes(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    store = RemoteStore(f"file://{tmp_path / 'remote'}/")
    s = Syncer(LocalDir(root), store, keep_last=2, scan_interval=0.2)
    s.start()
    try:
        with open(root / "model.pt", "wb") as f:  # copying it to file:// costs the pass ~0.1 s of CPU
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        deadline = time.monotonic() + 120
        while not ((fs := newest_set(store)) and "model.pt" in fs.entries):
            assert time.monotonic() < deadline, "never uploaded"
            time.sleep(0.05)
        assert s.flush(60)  # a forced pass (not paced) runs after the one that uploaded ended
        # A one-file dir scans in well under 5 ms of CPU: the next pass is due at the
        # scan interval, not after the upload's CPU time / 0.005.
        assert s._idle_interval() < 1.0, s._idle_interval()
    finally:
        s.close(10)
