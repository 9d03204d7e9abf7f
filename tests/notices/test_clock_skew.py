"""A notice's own time read with a skewed local clock (issue 14, item 4).

The metadata server serves its times shifted as a client whose wall clock is 2.5 minutes or
a day fast or slow reads them. The deadline must stay within the platform's grace from when
the notice was first seen, and the save at the notice must still happen and be durable.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from metadata_servers import MetadataServer
from spotckpt._notices._metadata import AzureSource, EC2Source, MetadataWatcher
from spotckpt._notices._board import NoticeBoard
from spotckpt._remote._store import RemoteStore
from test_metadata_notices import events, start, wait_training

SKEWS = [-86400.0, -150.0, 0.0, 150.0, 86400.0]  # client clock behind (-) or ahead (+)
INTERVAL = 0.05
EC2_GRACE = 120.0  # AWS: the notice comes two minutes before the stop


@pytest.mark.parametrize("cloud", ["ec2", "azure"])
@pytest.mark.parametrize("skew", SKEWS)
def test_deadline_within_the_platforms_grace(skew: float, cloud: str, caplog) -> None:
    with MetadataServer() as md:
        md.skew = skew
        src = EC2Source(md.url) if cloud == "ec2" else AzureSource(md.url)
        board = NoticeBoard()
        watcher = MetadataWatcher(board, [src], on_advise=lambda s: None, interval=INTERVAL)
        with caplog.at_level(logging.WARNING, logger="spotckpt"):
            watcher.start()
            try:
                n_before, waited = len(md.requests), time.monotonic()
                deadline = waited + 10
                while len(md.requests) < n_before + 4 and time.monotonic() < deadline:
                    time.sleep(0.01)  # a few polls that found no notice
                armed = time.monotonic()
                if cloud == "ec2":
                    md.spot_at = time.time() + EC2_GRACE  # the true time of the stop
                else:
                    md.azure_not_before = time.time() + 30.0
                assert board.wait(10)
                notice = board.notice
                time.sleep(3 * INTERVAL)  # later polls see it again: the deadline stays
                assert board.notice == notice
            finally:
                watcher.stop()
    grace = EC2_GRACE if cloud == "ec2" else 30.0
    left = notice.deadline - armed
    # at most `grace` after the notice appeared; at least `grace` after the last poll that
    # did not find it, which began after `waited` (the served times have a 1 s resolution)
    assert grace - 1.0 - (armed - waited) <= left <= grace + 0.01, (left, skew)
    warned = [r.getMessage() for r in caplog.records if "notice:" in r.getMessage()]
    if abs(skew) >= 150:
        assert len(warned) == 1 and "clock skew?" in warned[0], warned
    else:
        assert warned == []


@pytest.mark.parametrize("skew", [150.0, -86400.0])
def test_skewed_ec2_notice_still_saves_durably(tmp_path: Path, s3_remote: str, skew: float) -> None:
    """With the local clock 2.5 minutes fast the old code took the deadline as past: it saved
    locally, gave the upload 0 s and ended with nothing durable (the work since the last
    save lost); a day slow, it planned with a day the platform does not give."""
    local = tmp_path / "ck"
    with MetadataServer() as md:
        md.skew = skew
        proc = start(local, s3_remote, 5000, AWS_EC2_METADATA_SERVICE_ENDPOINT=md.url,
                     AWS_EC2_METADATA_DISABLED="false")
        wait_training(proc)
        md.spot_at = time.time() + EC2_GRACE
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 143, out
    ev = events(local)
    notice = next(e for e in ev if e["event"] == "notice")
    assert notice["source"].startswith("ec2-spot")
    plan = next(e for e in ev if e["event"] == "plan")
    flush = next(e for e in ev if e["event"] == "flush")
    assert plan["action"] == "save" or flush["step"] % 100 == 0, plan  # unless already saved
    assert flush["durable"] is True and flush["step"] == flush["durable_step"] > 0, flush
    assert RemoteStore(s3_remote).committed()[-1] == flush["step"]
    assert 100 < notice["seconds_left"] <= EC2_GRACE, notice
    assert sum("clock skew?" in line for line in out.splitlines()) == 1, out
