"""What users pick instead of spotckpt, each behind the same three calls, on the same state
and the same S3 server: ``save()`` (returns when the training thread may go on),
``busy()`` (the last save is not durable on the remote yet), ``wait()`` (until it is), and a
``restore()`` from an empty local dir into a model that exists.

Every boto3 client here has the settings of ``common.CONFIG_KWARGS`` and transfers files as
spotckpt does (16 MiB parts x 8 up, 64 MiB ranges x 8 down); every s3fs (DCP's fsspec
writer, Lightning's ``s3://`` paths, ``torch.save`` into an s3fs file) gets the same botocore
settings through ``fsspec.config.conf``. Each keeps the last two checkpoints on the remote,
as the Checkpointer does (``keep_last=2``): moto slows down the more it holds.

The Amazon S3 Connector for PyTorch (``s3torchconnector``, the AWS CRT's client in Rust) is
pointed at the same endpoint with ``endpoint=`` and ``S3ClientConfig(force_path_style=True)``
(plain http on 127.0.0.1 works: the scheme is taken from the URL); its defaults otherwise
(8 MiB parts, a 10 Gb/s throughput target), as an AWS user gets them. Its DCP
``S3StorageWriter``/``S3StorageReader`` (1.5.0) take no endpoint: their ``S3FileSystem``
builds its ``S3Client(region, ...)`` without one, so here that client is replaced by the
same class built with the endpoint (:func:`s3torch_dcp`).
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from common import CONFIG_KWARGS, MiB, checkpointer, client, endpoint

LABELS = {
    "spotckpt": "spotckpt `Checkpointer`",
    "sagemaker": "SageMaker pattern: `torch.save` into the dir + background boto3 upload",
    "dcp_local": "DCP `async_save` to a local dir + boto3 upload of the dir",
    "dcp_s3": "DCP `async_save` with its fsspec writer to `s3://`",
    "lightning_local": "Lightning `AsyncCheckpointIO` local + boto3 upload",
    "lightning_s3": "Lightning `AsyncCheckpointIO` to `s3://`",
    "s3fs_save": "`torch.save` straight into an s3fs file",
    "s3torch": "s3torchconnector: `torch.save` into its `S3Checkpoint` writer",
    "s3torch_dcp": "s3torchconnector DCP: `async_save` with its `S3StorageWriter`",
}
CONTENDERS = list(LABELS)
KEEP = 2


class Model:
    """The model that exists before a restore: its tensors are loaded into, in place."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, v in sd.items():
            self.sd[k].copy_(v)


def s3fs_defaults() -> None:
    """Every s3fs built from here on (fsspec's own config) talks to the bench's server with
    the bench's botocore settings."""
    import fsspec.config

    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint(), "region_name": "us-east-1"},
                                "config_kwargs": dict(CONFIG_KWARGS), "skip_instance_cache": True}


def _manager(part: int) -> Any:
    from s3transfer.manager import TransferConfig, TransferManager

    conf = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_request_concurrency=8)
    return TransferManager(client(), conf)


def upload_tree(local: Path, bucket: str, prefix: str) -> None:
    """Every file under ``local`` to ``prefix/``, in parallel (s3transfer)."""
    m = _manager(16 * MiB)
    try:
        futs = [m.upload(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")
                for f in sorted(local.rglob("*")) if f.is_file()]
        for f in futs:
            f.result()
    finally:
        m.shutdown()


def download_prefix(bucket: str, prefix: str, local: Path) -> None:
    c = client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    m = _manager(64 * MiB)
    try:
        futs = []
        for k in keys:
            dst = local / k[len(prefix) + 1:]
            dst.parent.mkdir(parents=True, exist_ok=True)
            futs.append(m.download(bucket, k, str(dst)))
        for f in futs:
            f.result()
    finally:
        m.shutdown()


def delete_prefix(bucket: str, prefix: str) -> None:
    c = client()
    keys = [{"Key": o["Key"]} for o in c.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    if keys:
        c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def newest(bucket: str, prefix: str) -> str:
    """The newest ``step-N`` name under ``prefix/`` (by N)."""
    names = set()
    for o in client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        names.add(o["Key"][len(prefix) + 1:].split("/", 1)[0])
    return max(names, key=lambda n: int(n.split("-")[1].split(".")[0]))


class Peer:
    """A contender's save side. ``n`` counts saves; checkpoints are named ``step-n``."""

    def __init__(self, model: Model, bucket: str, prefix: str, wd: Path) -> None:
        self.model, self.bucket, self.prefix, self.wd = model, bucket, prefix, wd
        self.n = 0
        self.done: Future | None = None
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._worker, daemon=True)
        self._t.start()

    def _worker(self) -> None:  # the background uploader: jobs in order, one at a time
        while True:
            job, fut = self._q.get()
            try:
                job()
                fut.set_result(None)
            except BaseException as e:  # noqa: BLE001 - surfaced by wait()
                fut.set_exception(e)

    def background(self, job: Callable[[], None]) -> Future:
        fut: Future = Future()
        self._q.put((job, fut))
        self.done = fut
        return fut

    def retire(self, n: int, local: Path | None = None) -> None:
        """Keep ``KEEP`` checkpoints: delete ``step-(n-KEEP)`` remotely and locally."""
        old = n - KEEP
        if old >= 0:
            delete_prefix(self.bucket, f"{self.prefix}/step-{old}")
            if local is not None:
                shutil.rmtree(local / f"step-{old}", ignore_errors=True)
                for f in local.glob(f"step-{old}.*"):
                    f.unlink()

    def save(self) -> None:
        raise NotImplementedError

    def busy(self) -> bool:
        return self.done is not None and not self.done.done()

    def wait(self) -> None:
        if self.done is not None:
            self.done.result()

    def close(self) -> None:
        self.wait()


class Spot(Peer):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.ck = checkpointer({"model": self.model}, self.wd / "ckpt", f"s3://{self.bucket}/{self.prefix}/",
                               keep_last=KEEP)
        self.ck.open()

    def save(self) -> None:
        self.ck.step += 1
        self.ck.save()

    def busy(self) -> bool:
        d = self.ck.durable_step
        return d is None or d < self.ck.step

    def wait(self) -> None:
        if not self.ck.wait_durable(None, 600):
            raise RuntimeError(f"spotckpt: not durable: {self.ck.last_error}")

    def close(self) -> None:
        self.ck.close()


class SageMaker(Peer):
    def save(self) -> None:
        import torch

        n, local = self.n, self.wd / "ckpt"
        local.mkdir(parents=True, exist_ok=True)
        f = local / f"step-{n}.pt"
        torch.save({"model": self.model.state_dict()}, f)
        self.n += 1
        self.background(lambda: (upload_tree_file(f, self.bucket, f"{self.prefix}/{f.name}"), self.retire(n, local)))


def upload_tree_file(f: Path, bucket: str, key: str) -> None:
    m = _manager(16 * MiB)
    try:
        m.upload(str(f), bucket, key).result()
    finally:
        m.shutdown()


class DcpLocal(Peer):
    def save(self) -> None:
        import torch.distributed.checkpoint as dcp

        n, local = self.n, self.wd / "ckpt"
        if self.done is not None:
            self.done.result()  # DCP's rule: resolve the previous save before the next
        d = local / f"step-{n}"
        fut = dcp.async_save({"model": self.model.state_dict()}, checkpoint_id=str(d), no_dist=True)
        self.n += 1
        self.background(lambda: (fut.result(), upload_tree(d, self.bucket, f"{self.prefix}/step-{n}"),
                                 self.retire(n, local)))


class DcpS3(Peer):
    def save(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        n = self.n
        if self.done is not None:
            self.done.result()
        w = FsspecWriter(f"s3://{self.bucket}/{self.prefix}/step-{n}")
        fut = dcp.async_save({"model": self.model.state_dict()}, storage_writer=w, no_dist=True)
        self.n += 1
        self.background(lambda: (fut.result(), self.retire(n)))


class Lightning(Peer):
    remote = False

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        self.io = AsyncCheckpointIO(TorchCheckpointIO())

    def save(self) -> None:
        n, local = self.n, self.wd / "ckpt"
        local.mkdir(parents=True, exist_ok=True)
        path = f"s3://{self.bucket}/{self.prefix}/step-{n}.ckpt" if self.remote else str(local / f"step-{n}.ckpt")
        self.io.save_checkpoint({"state_dict": self.model.state_dict()}, path)
        self.n += 1
        saved: Future = self.io._executor.submit(lambda: None)  # its one worker: after the save
        if self.io._error:
            raise self.io._error
        if self.remote:
            self.background(lambda: (saved.result(), self.retire(n)))
        else:
            self.background(lambda: (saved.result(), upload_tree_file(Path(path), self.bucket,
                                                                      f"{self.prefix}/step-{n}.ckpt"),
                                     self.retire(n, local)))

    def close(self) -> None:
        self.wait()
        self.io.teardown()


class LightningS3(Lightning):
    remote = True


class S3fsSave(Peer):
    def save(self) -> None:
        import fsspec
        import torch

        n = self.n
        with fsspec.open(f"s3://{self.bucket}/{self.prefix}/step-{n}.pt", "wb") as f:
            torch.save({"model": self.model.state_dict()}, f)
        self.n += 1
        self.retire(n)


def s3torch_config() -> Any:
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)  # a bucket on 127.0.0.1 has no DNS name


def s3torch_dcp(kind: str, path: str) -> Any:
    """s3torchconnector's DCP writer or reader for ``path``, talking to the bench's endpoint."""
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

    cls = S3StorageWriter if kind == "writer" else S3StorageReader
    io = cls(region="us-east-1", path=path, s3client_config=s3torch_config())
    # built without an endpoint (it takes none): the same client class, with it
    io.fs._client = S3Client("us-east-1", endpoint=endpoint(), s3client_config=s3torch_config())
    return io


class S3Torch(Peer):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from s3torchconnector import S3Checkpoint

        self.ck = S3Checkpoint(region="us-east-1", endpoint=endpoint(), s3client_config=s3torch_config())

    def save(self) -> None:  # no background part: durable when its writer closes
        import torch

        n = self.n
        with self.ck.writer(f"s3://{self.bucket}/{self.prefix}/step-{n}.pt") as w:
            torch.save({"model": self.model.state_dict()}, w)
        self.n += 1
        self.retire(n)


class S3TorchDcp(Peer):
    def save(self) -> None:
        import torch.distributed.checkpoint as dcp

        n = self.n
        if self.done is not None:
            self.done.result()  # DCP's rule: resolve the previous save before the next
        w = s3torch_dcp("writer", f"s3://{self.bucket}/{self.prefix}/step-{n}")
        fut = dcp.async_save({"model": self.model.state_dict()}, storage_writer=w, no_dist=True)
        self.n += 1
        self.background(lambda: (fut.result(), self.retire(n)))


SAVERS: dict[str, type[Peer]] = {"spotckpt": Spot, "sagemaker": SageMaker, "dcp_local": DcpLocal, "dcp_s3": DcpS3,
                                 "lightning_local": Lightning, "lightning_s3": LightningS3, "s3fs_save": S3fsSave,
                                 "s3torch": S3Torch, "s3torch_dcp": S3TorchDcp}


def restore(name: str, model: Model, bucket: str, prefix: str, wd: Path) -> None:
    """Empty local dir ``wd`` -> the newest checkpoint loaded into ``model`` (each as its
    users would: the libraries imported, the client built here)."""
    import torch

    if name == "spotckpt":
        ck = checkpointer({"model": model}, wd / "ckpt", f"s3://{bucket}/{prefix}/")
        ck.open()
        assert ck.restored_step is not None
        ck.close()
        return
    if name in ("dcp_local", "dcp_s3", "s3torch_dcp"):
        import torch.distributed.checkpoint as dcp

        step = newest(bucket, prefix)
        if name == "s3torch_dcp":
            dcp.load({"model": model.state_dict()}, storage_reader=s3torch_dcp("reader", f"s3://{bucket}/{prefix}/{step}"),
                     no_dist=True)
        elif name == "dcp_s3":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            dcp.load({"model": model.state_dict()}, storage_reader=FsspecReader(f"s3://{bucket}/{prefix}/{step}"),
                     no_dist=True)
        else:
            download_prefix(bucket, f"{prefix}/{step}", wd / step)
            dcp.load({"model": model.state_dict()}, checkpoint_id=str(wd / step), no_dist=True)
        return
    if name == "s3torch":
        from s3torchconnector import S3Checkpoint

        key = newest(bucket, prefix)
        ck = S3Checkpoint(region="us-east-1", endpoint=endpoint(), s3client_config=s3torch_config())
        with ck.reader(f"s3://{bucket}/{prefix}/{key}") as r:
            sd = torch.load(r, map_location="cpu", weights_only=True)
    elif name in ("lightning_s3", "s3fs_save"):
        import fsspec

        key = newest(bucket, prefix)
        with fsspec.open(f"s3://{bucket}/{prefix}/{key}", "rb") as f:
            sd = torch.load(f, map_location="cpu", weights_only=True)
    else:  # downloaded into the dir with boto3 (SageMaker copies the prefix in before the job starts)
        key = newest(bucket, prefix)
        wd.mkdir(parents=True, exist_ok=True)
        m = _manager(64 * MiB)
        try:
            m.download(bucket, f"{prefix}/{key}", str(wd / key)).result()
        finally:
            m.shutdown()
        sd = torch.load(wd / key, map_location="cpu", weights_only=True)
    model.load_state_dict(sd["state_dict" if name.startswith("lightning") else "model"])


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        os.unlink(path)
