"""Fast S3 transfers for checkpoint payloads: boto3 + s3transfer, no ML imports.

s3fs's ``put_file`` sends a big file's parts one request after another and its sync wrapper
costs a few ms per call; ``bench/`` measured it at about half the throughput of a tuned
boto3 multipart upload. So for ``s3://`` remotes the store moves bytes through this module:
multipart uploads with parallel parts, parallel ranged downloads, and single requests
(``put_object``/``head_object``) for small objects, where latency is what counts. Listing
and deletes stay on s3fs. The client is built from the same settings s3fs resolved (key,
secret, token, profile, anon, endpoint, ``client_kwargs``, ``config_kwargs``), so both see
the same bucket with the same credentials and signing; settings this module does not
understand (``s3_additional_kwargs``, requester pays, versioning, a custom session) turn it
off and everything goes through s3fs.
"""
from __future__ import annotations

import base64
import os
import threading
import zlib
from typing import Any, Callable

# Part size and parallelism, from bench/'s sweep: on loopback and on EC2 to S3 alike,
# 16 MiB parts with 8 in flight keep the link busy while bounding memory to ~128 MiB per
# transfer, and stay far below S3's 10,000-part limit up to 156 GiB files (bigger files get
# bigger parts, see _part_size).
PART_SIZE = 16 << 20
CONCURRENCY = 8
MAX_PARTS = 10_000
MIN_RANGE, MAX_RANGE = 64 << 20, 256 << 20  # ranged GETs of a download


# One boto3 session per process and settings (issue 25): a client built from a new session
# costs ~0.06-0.09 CPU-s (the service model, endpoint rules, credential chain), one more from
# the same session ~4 ms, so every store of a process, the restore's, the Syncer's and the
# watched dir's, builds its client from the one session. (Each client keeps its own event
# hooks: what one store registers does not reach another's requests.)
_SESSIONS: dict[str, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _session(session_kwargs: dict) -> Any:
    import boto3

    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))  # what boto3 reads too
    key = repr((sorted(session_kwargs.items()), env))
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = boto3.session.Session(**session_kwargs)
        return _SESSIONS[key]


def _part_size(size: int) -> int:
    part = PART_SIZE
    while size > part * MAX_PARTS:
        part *= 2
    return part


# s3fs options S3Fast reproduces as they are (anything else: S3Fast.for_fs on a built s3fs).
_OPTIONS = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "config_kwargs", "profile",
            "use_ssl", "skip_instance_cache", "use_listings_cache"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "InvalidToken", "ExpiredToken"}


def crc32_b64(data: bytes) -> str:
    """A body's CRC32 as S3 writes it in ``x-amz-checksum-crc32`` (base64, big-endian)."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def translate(e: BaseException) -> BaseException:
    """botocore's ClientError as the built-in error it means (as s3fs's ``errors.py`` does)."""
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return e
    err = resp.get("Error") or {}
    code = str(err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    msg = f"{code}: {err.get('Message') or e}"
    if code in _NOT_FOUND:
        return FileNotFoundError(msg)
    if code in _DENIED:
        return PermissionError(msg)
    return e


class S3Fast:
    """Big-file transfers for one bucket, sharing the settings of an s3fs filesystem.

    Example:
        >>> fast = S3Fast.for_fs(fs, "bucket/prefix")  # doctest: +SKIP
        >>> fast.put_file("/tmp/state.pt", "prefix/step-000000000100/state.pt")
    """

    def __init__(self, bucket: str, *, session_kwargs: dict[str, Any], client_kwargs: dict[str, Any],
                 config_kwargs: dict[str, Any]) -> None:
        self.bucket = bucket
        self._session_kwargs, self._client_kwargs, self._config_kwargs = session_kwargs, client_kwargs, config_kwargs
        self._lock = threading.Lock()
        self._client: Any = None
        self._manager: Any = None
        self._etags: dict[str, str | None] = {}  # key -> ETag of its last HEAD, until get_file

    @classmethod
    def for_fs(cls, fs: Any, root: str) -> S3Fast | None:
        """A fast path matching ``fs`` (an s3fs filesystem), or None if it cannot match it."""
        try:
            import boto3  # noqa: F401
            import s3transfer.manager  # noqa: F401
        except ImportError:
            return None
        if (getattr(fs, "s3_additional_kwargs", None) or getattr(fs, "req_kw", None)
                or getattr(fs, "version_aware", False) or getattr(fs, "session", None) is not None):
            return None
        extra = dict(getattr(fs, "kwargs", {}) or {})
        profile = extra.pop("profile", None)
        if extra:
            return None  # session settings we would not reproduce faithfully
        opts = {k: getattr(fs, k, None) for k in ("client_kwargs", "endpoint_url", "key", "secret", "token",
                                                    "use_ssl", "config_kwargs", "anon")}
        return cls._build(root, dict(opts, profile=profile))

    @classmethod
    def for_options(cls, opts: dict[str, Any], root: str) -> S3Fast | None:
        """As :meth:`for_fs`, from the s3fs options themselves (no s3fs import), or None when
        they hold anything beyond the settings below (the caller then builds the s3fs
        filesystem and asks :meth:`for_fs`)."""
        if set(opts) - _OPTIONS:
            return None
        try:
            import boto3  # noqa: F401
            import s3transfer.manager  # noqa: F401
        except ImportError:
            return None
        return cls._build(root, opts)

    @classmethod
    def _build(cls, root: str, o: dict[str, Any]) -> S3Fast | None:
        bucket = root.split("/", 1)[0]
        if not bucket:
            return None
        session_kwargs: dict[str, Any] = {}
        if o.get("profile"):
            session_kwargs["profile_name"] = o["profile"]
        ck = dict(o.get("client_kwargs") or {})
        if o.get("endpoint_url") and "endpoint_url" not in ck:
            ck["endpoint_url"] = o["endpoint_url"]
        if o.get("key"):
            ck.setdefault("aws_access_key_id", o["key"])
        if o.get("secret"):
            ck.setdefault("aws_secret_access_key", o["secret"])
        if o.get("token"):
            ck.setdefault("aws_session_token", o["token"])
        if o.get("use_ssl", True) is False:
            ck.setdefault("use_ssl", False)
        cfg = dict(o.get("config_kwargs") or {})
        if o.get("anon"):
            from botocore import UNSIGNED

            cfg["signature_version"] = UNSIGNED
        return cls(bucket, session_kwargs=session_kwargs, client_kwargs=ck, config_kwargs=cfg)

    # -- clients (built on first use: boto3 costs ~0.3 s to import) ----------------------------
    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from botocore.config import Config

                cfg = dict(self._config_kwargs)
                cfg.setdefault("max_pool_connections", 2 * CONCURRENCY)
                session = _session(self._session_kwargs)
                with _SESSIONS_LOCK:  # (a botocore session builds one client at a time)
                    self._client = session.client("s3", config=Config(**cfg), **self._client_kwargs)
            return self._client

    def _transfer_manager(self, part: int) -> Any:
        from s3transfer.manager import TransferConfig, TransferManager

        client = self.client
        conf = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                              max_request_concurrency=CONCURRENCY)
        return TransferManager(client, conf)

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - mapped to built-ins, re-raised
            t = translate(e)
            if t is e:
                raise
            raise t from e

    # -- operations ------------------------------------------------------------------------
    def put_confirmed(self, key: str, data: bytes) -> bool:
        """One PUT of ``data``; True if the response itself confirms the server stored exactly
        these bytes (it echoes the CRC32 botocore sent, which S3 and MinIO check), so the
        commit protocol's size check needs no HEAD afterwards (a round trip saved per small
        checkpoint, bench/ row 6). False: the caller must confirm with :meth:`size`."""
        resp = self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))
        echoed = resp.get("ChecksumCRC32") if isinstance(resp, dict) else None
        return echoed is not None and echoed == crc32_b64(data)

    def put_file(self, local: str, key: str, progress: Callable[[int], None] | None = None) -> bool:
        """Upload ``local`` to ``key``: one PUT up to a part size, multipart above. Returns
        :meth:`put_confirmed`'s answer for a single PUT, False for a multipart upload."""
        size = os.path.getsize(local)
        part = _part_size(size)
        if size <= part:
            with open(local, "rb") as f:
                data = f.read()
            if len(data) != size:
                raise OSError(f"{local}: read {len(data)} of {size} bytes")
            ok = self.put_confirmed(key, data)
            if progress is not None and size:
                progress(size)
            return ok
        self._transfer(lambda m, subs: m.upload(local, self.bucket, key, subscribers=subs), part, progress)
        # CompleteMultipartUpload assembled exactly the parts sent (each answered, its CRC32
        # checked by the server), which cover the file: no HEAD to confirm the size (issue 25).
        return True

    def get_file(self, key: str, local: str, progress: Callable[[int], None] | None = None,
                 size: int | None = None) -> None:
        """Download ``key`` to ``local`` with CONCURRENCY parallel ranged GETs.

        One range per connection (64-256 MiB): S3 serves each connection at a steady
        rate, so more, smaller ranges only add requests, and servers that copy the object for
        every range request (moto does) slow down with each one (bench/).
        """
        etag = self._etags.pop(key, None)
        if size is None:
            size = self.size(key)
            etag = self._etags.pop(key, None)
        # ranges of at least MIN_RANGE, no more than CONCURRENCY of them (a payload just over
        # MIN_RANGE is one range, not one and a sliver); big files: a straggler costs less
        part = min(-(-size // self.ranges(size)), MAX_RANGE)
        part = max(1, -(-part // (1 << 20))) << 20
        self._transfer(lambda m, subs: m.download(self.bucket, key, local, subscribers=subs), part,
                       progress, size=size, etag=etag)

    def ranges(self, size: int) -> int:
        """How many ranged GETs :meth:`get_file` makes for ``size`` bytes (1: one plain GET)."""
        return max(1, min(CONCURRENCY, size // MIN_RANGE))

    def get_exact(self, key: str, local: str, size: int,
                  progress: Callable[[int], None] | None = None) -> int:
        """Download ``key`` to ``local`` in one GET if the object has exactly ``size`` bytes
        (the size its manifest records: no HEAD first). Returns the object's real size, read
        from the answer's headers before its body: when it differs, nothing is written (a
        hostile or damaged object cannot fill the disk)."""
        def go() -> int:
            kw = {"Range": f"bytes=0-{size - 1}"} if size else {}
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=key, **kw)
            except Exception as e:  # noqa: BLE001 - an empty object asked for a range
                if size and "InvalidRange" in str(e):
                    return 0
                raise
            body = resp["Body"]
            try:
                rng = str(resp.get("ContentRange") or "")
                total = int(rng.rpartition("/")[2]) if "/" in rng else int(resp.get("ContentLength") or 0)
                if total != size:
                    return total
                with open(local, "wb") as f:
                    for chunk in body.iter_chunks(1 << 20):
                        f.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                return total
            finally:
                body.close()
        return self._call(go)

    def _transfer(self, start: Callable[[Any, list], Any], part: int,
                  progress: Callable[[int], None] | None, size: int | None = None,
                  etag: str | None = None) -> None:
        subs: list = []
        if size is not None:
            from s3transfer.subscribers import BaseSubscriber

            class _Size(BaseSubscriber):  # with both, s3transfer skips its own HEAD
                def on_queued(self, future: Any, **kw: Any) -> None:
                    future.meta.provide_transfer_size(size)
                    if etag is not None:  # the ranges are then read If-Match this version
                        future.meta.provide_object_etag(etag)

            subs.append(_Size())
        if progress is not None:
            from s3transfer.subscribers import BaseSubscriber

            class _Progress(BaseSubscriber):
                def on_progress(self, future: Any, bytes_transferred: int, **kw: Any) -> None:
                    if bytes_transferred > 0:
                        progress(bytes_transferred)

            subs.append(_Progress())

        def go() -> None:
            manager = self._transfer_manager(part)
            try:
                start(manager, subs).result()
            finally:
                manager.shutdown()
        self._call(go)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def cat(self, key: str) -> bytes:
        def go() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()
        return self._call(go)

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (one request per 1,000 keys)."""
        def go() -> list[str]:
            out: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                out += [o["Key"] for o in page.get("Contents", [])]
            return out
        return self._call(go)

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=key))

    def head_bucket(self) -> None:
        """Raises FileNotFoundError if the bucket does not exist (PermissionError: denied)."""
        self._call(lambda: self.client.head_bucket(Bucket=self.bucket))

    def size(self, key: str) -> int:
        """The object's size. Raises FileNotFoundError if it does not exist."""
        resp = self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        if len(self._etags) > 64:  # sizes checked without a download after (uploads)
            self._etags.clear()
        self._etags[key] = resp.get("ETag")  # for get_file, which then needs no HEAD of its own
        return int(resp["ContentLength"])
