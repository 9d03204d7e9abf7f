"""Helpers shared by the benchmark cases (``bench/cases.py``): the S3 client settings every
client uses, buckets, states of a given size, the raw boto3 baselines and timing helpers."""
from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Over plain http botocore SHA-256s every payload for the signature; over https (real S3)
# it does not. Both sides here are told not to, so loopback costs what https costs.
CONFIG_KWARGS: dict[str, Any] = {"s3": {"payload_signing_enabled": False}, "max_pool_connections": 16}
STORAGE_OPTIONS = {"config_kwargs": CONFIG_KWARGS}
MiB = 1 << 20


# -- helpers ----------------------------------------------------------------------------------
def now() -> float:
    return time.perf_counter()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def endpoint() -> str:
    return os.environ["AWS_ENDPOINT_URL_S3"]


def client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint(), region_name="us-east-1", config=Config(**CONFIG_KWARGS))


def new_bucket() -> str:
    name = f"bench-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=name)
    return name


def drop_bucket(name: str) -> None:
    c = client()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
        for o in page.get("Contents", []):
            c.delete_object(Bucket=name, Key=o["Key"])
    for up in c.list_multipart_uploads(Bucket=name).get("Uploads", []):
        c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    c.delete_bucket(Bucket=name)


def transfer_manager(part_mib: int, concurrency: int) -> Any:
    from s3transfer.manager import TransferConfig, TransferManager

    conf = TransferConfig(multipart_threshold=part_mib * MiB, multipart_chunksize=part_mib * MiB,
                          max_request_concurrency=concurrency)
    return TransferManager(client(), conf)


def raw_upload(path: str, bucket: str, key: str, part_mib: int, concurrency: int) -> float:
    """The baseline: a boto3 (s3transfer) multipart upload of a file already on disk."""
    m = transfer_manager(part_mib, concurrency)
    t = now()
    m.upload(path, bucket, key).result()
    dt = now() - t
    m.shutdown()
    return dt


def make_state(nbytes: int, pieces: int = 16) -> dict[str, Any]:
    """``nbytes`` of float32 tensors, in ``pieces`` tensors: a model's state_dict stand-in."""
    import torch

    n = nbytes // 4 // pieces
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(n, generator=g) for i in range(pieces)}


def memcpy_seconds(tensors: list[Any], reps: int = 5) -> float:
    """Median time to memcpy the tensors' bytes into preallocated, already touched buffers."""
    import numpy as np

    srcs = [t.numpy().view(np.uint8) for t in tensors]
    dsts = [np.empty_like(s) for s in srcs]
    for s, d in zip(srcs, dsts):
        np.copyto(d, s)  # touch every page once
    times = []
    for _ in range(reps):
        t = now()
        for s, d in zip(srcs, dsts):
            np.copyto(d, s)
        times.append(now() - t)
    return median(times)


def serialized_file(state: dict[str, Any], path: Path) -> int:
    """The bytes spotckpt would upload for ``state`` (its own serialiser), at ``path``."""
    from spotckpt._state import _snapshot as _state

    path.parent.mkdir(parents=True, exist_ok=True)
    snap = _state.snapshot({"model": state})
    entries = _state.write_state(path.parent, snap, _state.serializer_name())
    os.replace(path.parent / entries[0].path, path)
    return entries[0].size


def checkpointer(state: dict[str, Any], local: Path, remote: str | None, **kw: Any) -> Any:
    import spotckpt

    kw.setdefault("keep_last", 2)
    kw.setdefault("grace_seconds", 600)
    return spotckpt.Checkpointer(state, local_dir=local, remote=remote,
                                 storage_options=STORAGE_OPTIONS if remote else None, **kw)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="spotckpt-bench-", dir=os.environ.get("BENCH_TMP")))


# -- the S3 server ------------------------------------------------------------------------------
class ServerUnavailable(RuntimeError):
    """The requested S3 server cannot be started here (the reason is the message)."""


def start_server(kind: str) -> Any:
    """The S3 server the bench runs against, started by the bench itself: ``"rgw"`` (Ceph's
    RADOS Gateway, the bring-up script in ``tests/servers/``) or ``"moto"`` (moto's server in a
    subprocess, as the tests use). Returns an object with ``endpoint``, ``proc`` (None for
    RGW, whose daemons the script owns), ``env()``, ``client()``, ``new_bucket()``,
    ``stop()``, and ``name``. Raises ServerUnavailable with the reason when it cannot start."""
    sys.path.insert(0, str(REPO / "tests"))
    if kind == "moto":
        from conftest import start_moto

        server = start_moto()
        server.name = "moto"
        return server
    if kind == "rgw":
        try:
            from servers import rgw  # type: ignore[import-not-found]  # tests/servers/ (branch wt-rgw)
        except ImportError as e:
            raise ServerUnavailable(f"no RGW bring-up script in tests/servers/ ({e})") from None
        # an instance of the bench's own (run dir, ports): the test suite's stays untouched
        os.environ.setdefault("SPOTCKPT_RGW_DIR", "/tmp/spotckpt-rgw-bench")
        os.environ.setdefault("SPOTCKPT_RGW_PORT", "17580")
        try:
            info = rgw.up(lease=os.getpid())
        except Exception as e:  # noqa: BLE001 - any failure to start is reported, moto runs alone
            raise ServerUnavailable(f"RGW did not start: {type(e).__name__}: {e}") from None
        return RGWServer(rgw, info)
    raise ValueError(kind)


class RGWServer:
    """The bench's RGW instance (``tests/servers/rgw.py``), as ``start_server`` returns it."""

    name, proc = "rgw", None

    def __init__(self, rgw: Any, info: dict[str, Any]) -> None:
        self.rgw, self.info = rgw, info
        e = info["env"]
        self.endpoint, self.key, self.secret = e["AWS_ENDPOINT_URL_S3"], e["AWS_ACCESS_KEY_ID"], e["AWS_SECRET_ACCESS_KEY"]
        d = rgw.run_dir()
        self.pids = [p for p in (rgw._pid(d, n) for n in rgw.DAEMONS) if p]

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.rgw.release(os.getpid())
