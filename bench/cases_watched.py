"""Row 8: a file saved by an unmodified script under ``spotckpt run``, from the writer's
close to durable, against a raw boto3 upload of the same file written just before.

Imported by ``cases.py`` (run as ``python bench/cases.py watched '<json>'``). The script is
``watched_writer.py`` (no spotckpt import): it ``torch.save``s an N-byte tensor into the
watched dir when told on stdin and prints the time right after the close. Durable = the
``files_committed`` event (``ts``, wall clock) of the first file set that names that
version (checked afterwards against the set itself on the remote: size and mtime).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import REPO, STORAGE_OPTIONS, client, cpu_seconds, drop_bucket, median, new_bucket, now, raw_upload, workdir

# The supervisor's S3 clients get the botocore settings every client here uses
# (common.CONFIG_KWARGS) the way a user of the CLI sets them: the AWS config file.
AWS_CONFIG = "[default]\ns3 =\n    payload_signing_enabled = false\n"
WRITER = REPO / "bench" / "watched_writer.py"


class _Lines:
    """The supervised script's stdout (it inherits the supervisor's), line by line."""

    def __init__(self, stream: Any) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(x.rstrip("\n")) for x in stream], daemon=True).start()

    def expect(self, prefix: str, timeout: float = 300.0) -> str:
        end = time.monotonic() + timeout
        while True:
            line = self.q.get(timeout=max(0.01, end - time.monotonic()))
            if line.startswith(prefix):
                return line


class _Events:
    """Follows the supervisor's ``events.jsonl`` (read by offset; polled every 10 ms, which
    only delays noticing: the times come from the events' own ``ts``)."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.seen = path, 0, []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path) as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        cut = data.rfind("\n") + 1
        self.pos += len(data[:cut].encode())
        new = [json.loads(x) for x in data[:cut].splitlines() if x.strip()]
        self.seen += new
        return new

    def wait(self, pred: Any, timeout: float = 300.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.poll():
                if pred(e):
                    return e
            time.sleep(0.01)
        raise TimeoutError("no matching event within %.0f s" % timeout)


def _committed_version(bucket: str, seq: int, rel: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of ``rel`` in the remote set ``seq``."""
    from spotckpt._watch._fileset import set_key

    body = client().get_object(Bucket=bucket, Key="run/" + set_key(seq))["Body"].read()
    for e in json.loads(body)["entries"]:
        if e["path"] == rel:
            return e["size"], e["mtime_ns"]
    return None


def case_watched(p: dict[str, Any]) -> dict[str, Any]:
    """#8 close -> durable under ``spotckpt run`` vs raw boto3 (s3fast's part size and
    concurrency). Baseline and spotckpt alternate; both upload while the server holds one
    earlier copy (spotckpt's previous version until its new set is written, the
    baseline's previous raw copy)."""
    from spotckpt._commit._local import LocalDir
    from spotckpt._remote._s3fast import CONCURRENCY, PART_SIZE

    n, reps, scan = p["bytes"], p["reps"], p.get("scan_interval", 0.5)
    part, conc = PART_SIZE >> 20, CONCURRENCY
    wd, bucket = workdir(), new_bucket()
    local, base_dir = wd / "ckpt", wd / "base"
    local.mkdir()
    base_dir.mkdir()
    (wd / "aws-config").write_text(AWS_CONFIG)
    env = dict(os.environ, AWS_CONFIG_FILE=str(wd / "aws-config"), PYTHONUNBUFFERED="1")
    launcher = ["-m", "spotckpt"] if not p.get("launcher") else [p["launcher"]]  # (diagnosis: a wrapper)
    cmd = [sys.executable, *launcher, "run", "--local-dir", str(local), "--remote",
           f"s3://{bucket}/run/", "--scan-interval", str(scan), "--", sys.executable, str(WRITER), str(n)]
    log = open(wd / "supervisor.log", "w")
    sup = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    out, events = _Lines(sup.stdout), _Events(LocalDir(local).meta / "events.jsonl")
    base, times, to_upload, set_write, sup_log, sizes = [], [], [], [], "", []

    def save(path: Path) -> tuple[int, float]:
        assert sup.stdin is not None
        sup.stdin.write(f"{path}\n")
        sup.stdin.flush()
        _, _, size, t = out.expect(f"closed {path} ").split()
        return int(size), float(t)

    def spot_save(target: Path) -> tuple[float, float, float]:
        rel = target.relative_to(local).as_posix()
        size, t_close = save(target)
        sizes.append(size)
        mtime = target.stat().st_mtime_ns
        while True:
            e = events.wait(lambda e: e["event"] == "files_committed" and e["ts"] >= t_close - 0.001)
            if _committed_version(bucket, e["seq"], rel) == (size, mtime):
                break
        up = [x["ts"] for x in events.seen if x["event"] == "mirror_upload" and x.get("path") == rel
              and x["ts"] >= t_close - 0.001]
        return e["ts"] - t_close, (up[0] if up else e["ts"]) - t_close, e["ts"] - (up[0] if up else e["ts"])

    try:
        out.expect("ready", timeout=600)
        target = local / "model.pt"
        # Warm-up, untimed: one committed version and one raw copy on the server.
        spot_save(target)
        save(base_dir / "model.pt")
        raw_upload(str(base_dir / "model.pt"), bucket, "raw/0", part, conc)
        for r in range(reps):
            save(base_dir / "model.pt")  # the baseline's file, written just before
            base.append(raw_upload(str(base_dir / "model.pt"), bucket, f"raw/{r + 1}", part, conc))
            client().delete_object(Bucket=bucket, Key=f"raw/{r}")
            (base_dir / "model.pt").unlink()
            dt, up, sw = spot_save(target)
            times.append(dt)
            to_upload.append(up)
            set_write.append(sw)
        assert sup.stdin is not None
        sup.stdin.close()
        rc = sup.wait(300)
        assert rc == 0, f"spotckpt run exited {rc}"
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        log.close()
        sup_log = (wd / "supervisor.log").read_text()
        if p.get("log_to"):
            Path(p["log_to"]).write_text(sup_log)
        sup_log = sup_log[-600:]
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    b, s = median(base), median(times)
    return {"base": b, "spotckpt": s, "ratio": s / b, "bytes": sizes[-1], "times": times, "bases": base,
            "to_uploaded": to_upload, "set_write": set_write, "part": part, "conc": conc,
            "scan_interval": scan, "supervisor_log": sup_log}


def _raw_download_all(bucket: str, prefix: str, dest: Path, threads: int = 8) -> None:
    """The baseline: list ``prefix`` and GET every object, ``threads`` boto3 threads (one
    client, as boto3 documents for threads), each written to ``dest``."""
    from concurrent.futures import ThreadPoolExecutor

    c = client()
    keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]

    def one(k: str) -> None:
        out = dest / k[len(prefix):]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(c.get_object(Bucket=bucket, Key=k)["Body"].read())
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, keys))


def case_files_restore(p: dict[str, Any]) -> dict[str, Any]:
    """#8b the watched dir's restore: ``files`` files of ``bytes`` each, mirrored by a
    writer (untimed), then brought into an empty dir by ``restore_files`` (a fresh store:
    its client built inside the clock) against ``threads`` boto3 threads GETting the same
    objects (their client built inside the clock too); alternated, ``reps`` times each.
    Then a writer's start over that remote (restore + the watcher's baseline) counts its
    LIST requests."""
    from spotckpt._commit._local import LocalDir
    from spotckpt._remote._store import RemoteStore
    from spotckpt._watch._pull import restore_files
    from spotckpt._watch._watcher import Watcher

    n, size, reps = p["files"], p["bytes"], p["reps"]
    wd, bucket = workdir(), new_bucket()
    remote = f"s3://{bucket}/run/"
    src = wd / "src"
    blob = os.urandom(size)
    try:
        for i in range(n):
            f = src / f"logs/d{i // 100:03d}/f{i % 100:03d}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(i.to_bytes(8, "little") + blob[8:])
        w = Watcher(LocalDir(src, state=wd / "s-src"), RemoteStore(remote, STORAGE_OPTIONS))
        while not w.run_pass():
            pass
        assert w.current is not None and len(w.current.entries) == n
        base, spot, base_cpu, spot_cpu = [], [], [], []
        for r in range(reps):
            d = wd / f"raw{r}"
            t, c = now(), cpu_seconds()
            _raw_download_all(bucket, "run/files/", d, p.get("threads", 8))
            base.append(now() - t)
            base_cpu.append(cpu_seconds() - c)
            shutil.rmtree(d)
            d = wd / f"spot{r}"
            t, c = now(), cpu_seconds()
            _, got, _ = restore_files(LocalDir(d, state=wd / f"s-spot{r}"), RemoteStore(remote, STORAGE_OPTIONS))
            spot.append(now() - t)
            spot_cpu.append(cpu_seconds() - c)
            assert len(got) == n, (len(got), n)
            shutil.rmtree(d)

        class _Lists(RemoteStore):
            lists = 0

            def list_keys(self, under: str = "") -> list[str]:
                _Lists.lists += 1
                return super().list_keys(under)
        d = wd / "start"
        store = _Lists(remote, STORAGE_OPTIONS)
        restore_files(LocalDir(d, state=wd / "s-start"), store)
        Watcher(LocalDir(d, state=wd / "s-start"), store).load()
        lists = _Lists.lists
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        drop_bucket(bucket)
    b, s = median(base), median(spot)
    return {"files": n, "bytes": size, "base": b, "spotckpt": s, "ratio": s / b, "min_ratio": min(spot) / min(base),
            "bases": base, "times": spot, "base_cpu": median(base_cpu), "spot_cpu": median(spot_cpu),
            "start_lists": lists, "threads": p.get("threads", 8)}
