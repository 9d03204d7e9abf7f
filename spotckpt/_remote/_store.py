"""The remote store: fsspec only, no ML imports.

One :class:`RemoteStore` wraps an fsspec URL (``s3://bucket/prefix/``, ``file:///path/``,
...). For ``s3://`` the bytes of uploads, downloads and single-object reads and writes go
through a boto3/s3transfer fast path (:mod:`._s3fast`: parallel multipart parts, ranged
GETs) built from the same settings; listing and deletes stay on s3fs. Every call retries transient failures with exponential backoff; when the budget runs
out it raises :class:`RemoteError` naming the remote and the last cause. Credentials and
presigned query strings never reach a message (:func:`redact`). The checkpoints under the
prefix (which steps are committed, their manifests) are its base, :mod:`._checkpoints`.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from spotckpt._errors import CorruptCheckpointError, RemoteAccessError, RemoteError, RemoteNotFoundError
from spotckpt._events import redact  # noqa: F401 - redact: re-exported

from ._checkpoints import Checkpoints, _manifest_step
from ._storeopts import _cause, _is_permanent, storage_options_for
from ._transfer import Transfer as _Transfer

log = logging.getLogger("spotckpt")
T = TypeVar("T")


def _protocols(fs: Any) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


class RemoteStore(Checkpoints):
    """Files under one remote prefix, with retries and clear errors.

    Args:
        url: the remote prefix (``s3://bucket/prefix/``).
        attempts: tries per operation before :class:`RemoteError`.
        sleep: injected for tests.

    Example:
        >>> store = RemoteStore("file:///tmp/remote/")  # doctest: +SKIP
        >>> store.probe(); store.committed()
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 attempts: int = 6, base_delay: float = 0.2, max_delay: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self._opts = storage_options_for(self.url, storage_options)
        self._fs: Any = None
        self._fs_lock = threading.Lock()
        self.attempts, self.base_delay, self.max_delay, self._sleep = attempts, base_delay, max_delay, sleep
        # Optional: called with byte counts as uploads/downloads progress (progress bars).
        self.progress: Callable[[int], None] | None = None
        self.fast = None
        if self.url.split("://", 1)[0].lower() in ("s3", "s3a"):
            # s3fs (listing, deletes) is imported on first use: a restore goes through the
            # boto3 fast path alone, so its first byte waits for neither s3fs's import nor
            # its first-request set-up (bench/ peers: ~0.4 s of a 64 MiB restore).
            from ._s3fast import S3Fast

            self.root = self.url.split("://", 1)[1].rstrip("/")
            self.fast = S3Fast.for_options(self._opts, self.root)
        if self.fast is None:
            self.root = self._make_fs()
        self.is_local = self._fs is not None and "file" in _protocols(self._fs)
        from ._stream import StreamRegistry

        self.streams = StreamRegistry()  # streams started before put_file, by rel
        # The newest step whose manifest this process has seen on the remote (a listing, or
        # its own upload); None until the first listing. Steps above it have no remote
        # manifest unless another writer shares the prefix: see known_absent().
        self.newest_listed: int | None = None

    def _make_fs(self) -> str:
        import fsspec.core

        fs, root = fsspec.core.url_to_fs(self.url, **self._opts)
        if "s3" in _protocols(fs):
            fs.retries = 1  # s3fs's retry loop: RemoteStore._call owns the budget
            if self.fast is None:
                from ._s3fast import S3Fast

                self.fast = S3Fast.for_fs(fs, root.rstrip("/"))
        self._fs = fs
        return root.rstrip("/")

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (for ``s3://``, built on first use)."""
        if self._fs is None:
            with self._fs_lock:
                if self._fs is None:
                    self._make_fs()
        return self._fs

    @fs.setter
    def fs(self, value: Any) -> None:
        self._fs = value

    def _key(self, rel: str) -> str:
        """The S3 key of ``rel`` (the root without its bucket)."""
        return self.path(rel).split("/", 1)[1]

    # -- plumbing --------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.base_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if _is_permanent(e) or attempt == self.attempts:
                    raise self._error(what, e, attempt) from None
                log.debug("spotckpt: %s failed (%s), retry %d", what, _cause(e), attempt)
                self._sleep(min(self.max_delay, delay) * (0.5 + random.random()))
                delay *= 2
        raise AssertionError("unreachable")

    def _error(self, what: str, e: BaseException, attempts: int) -> RemoteError:
        cause = _cause(e)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        msg = f"spotckpt: remote {self.url}: {what} failed{tries}: {cause}"
        if isinstance(e, FileNotFoundError) or "NoSuchBucket" in cause:
            return RemoteNotFoundError(msg + " (does the bucket exist? check SPOTCKPT_REMOTE)")
        if isinstance(e, PermissionError) or _is_permanent(e) and "Credential" in cause:
            return RemoteAccessError(msg + " (check AWS credentials and bucket policy)")
        return RemoteError(msg)

    # -- basic operations ------------------------------------------------------------------
    def probe(self) -> None:
        """Write and delete a small object, so a bad bucket or credentials fail up front."""
        rel = f".spotckpt-probe-{uuid.uuid4().hex}.sagemaker-ignore"
        fast = self.fast
        try:
            if fast is not None:  # the client the restore then downloads with
                self._call("write probe", lambda: fast.put_bytes(self._key(rel), b"spotckpt probe"))
                self._call("delete probe", lambda: fast.delete(self._key(rel)))
                return
            self._call("write probe", lambda: self.fs.pipe_file(self.path(rel), b"spotckpt probe"))
            self._call("delete probe", lambda: self.fs.rm_file(self.path(rel)))
        except RemoteError as e:
            raise type(e)(str(e).replace("write probe failed", "write probe failed (is the remote writable?)")) from None

    def stream_file(self, local: str | os.PathLike[str], rel: str, *, unless: str | None = None,
                    committed: str | os.PathLike[str] | None = None) -> Any:
        """Start uploading ``local`` while its writer is still appending to it, so that a
        later :meth:`put_file` of the same file finds it there, confirmed (``s3://`` only;
        None elsewhere). Nothing is sent if object ``unless`` (the checkpoint's manifest)
        exists. ``committed``: where ``local`` is once its checkpoint is committed (a small
        file may be written and renamed before the stream first looks). See :mod:`._stream`
        for which files qualify."""
        if self.fast is None:
            return None
        from ._stream import StreamUpload

        up = StreamUpload(self.fast, self._key(rel), Path(local),
                          guard=None if unless is None else self._key(unless),
                          committed=None if committed is None else Path(committed))
        self.streams.add(rel, up, unless)
        return up

    def known_absent(self, rel: str) -> bool:
        """Whether ``rel`` is known not to exist without asking: a manifest above
        :attr:`newest_listed`, or an object a stream just checked (saves the HEAD of the
        manifest before a freshly committed checkpoint is uploaded)."""
        step = _manifest_step(rel)
        if step is not None and self.newest_listed is not None and step > self.newest_listed:
            return True
        return self.streams.checked_absent(rel)

    def put_file(self, local: str | os.PathLike[str], rel: str) -> int:
        """Upload one file and confirm its size on the remote. Returns that size."""
        want = os.path.getsize(local)
        streamed = self.streams.take(rel, local)

        def go() -> int:
            nonlocal streamed
            if streamed:
                streamed = False  # a retry uploads for real
                if self.progress is not None and want:
                    self.progress(want)
                return want  # the stream confirmed the size on the remote
            if self.fast is not None:
                if self.fast.put_file(os.fspath(local), self._key(rel), self.progress):
                    return want  # the PUT's response confirmed exactly these bytes
            else:
                with _Transfer(self.progress, want) as cb:
                    self.fs.put_file(os.fspath(local), self.path(rel), **cb.kwargs)
            got = self.size(rel, retry=False)
            if got != want:
                raise OSError(f"uploaded {rel} has {got} bytes, expected {want}")
            return got

        return self._call(f"upload of {rel}", go)

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Write a small object atomically (temp + rename on local filesystems)."""
        def go() -> None:
            if self.is_local:
                tmp = self.path(f"{rel}.{uuid.uuid4().hex[:8]}.tmp.sagemaker-ignore")
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, self.path(rel))
            elif self.fast is not None:
                self.fast.put_bytes(self._key(rel), data)
            else:
                self.fs.pipe_file(self.path(rel), data)
        self._call(f"write of {rel}", go)
        self.streams.written(rel)
        step = _manifest_step(rel)
        if step is not None and self.newest_listed is not None:
            self.newest_listed = max(self.newest_listed, step)

    def one_get(self, size: int) -> bool:
        """Whether :meth:`get_file` with ``expect=size`` needs no HEAD first: one GET of an
        ``s3://`` object under the range size, which reads the real size from its answer."""
        return self.fast is not None and self.fast.ranges(size) == 1

    def get_file(self, rel: str, local: str | os.PathLike[str], size: int | None = None, *,
                 expect: int | None = None) -> None:
        """Download ``rel``; ``size``: its size, just checked by the caller (saves a HEAD);
        ``expect``: the size its manifest records, unchecked (:meth:`one_get`: one GET that
        writes nothing if the object's real size differs).

        Raises:
            CorruptCheckpointError: the object does not have ``expect`` bytes.
        """
        if expect is not None and self.one_get(expect):
            fast = self.fast
            got = self._call(f"download of {rel}",
                             lambda: fast.get_exact(self._key(rel), os.fspath(local), expect, self.progress))
            if got != expect:
                raise CorruptCheckpointError(f"spotckpt: remote {rel} has {got} bytes, its manifest says {expect}")
            return
        size = expect if size is None else size

        def go() -> None:
            if self.fast is not None:
                self.fast.get_file(self._key(rel), os.fspath(local), self.progress, size=size)
                return
            with _Transfer(self.progress, None) as cb:
                self.fs.get_file(self.path(rel), os.fspath(local), **cb.kwargs)
                cb.total = os.path.getsize(local)
        self._call(f"download of {rel}", go)

    def cat(self, rel: str) -> bytes:
        if self.fast is not None:
            return self._call(f"read of {rel}", lambda: self.fast.cat(self._key(rel)))
        return self._call(f"read of {rel}", lambda: self.fs.cat_file(self.path(rel)))

    def size(self, rel: str, *, retry: bool = True) -> int:
        def go() -> int:
            if self.fast is not None:
                return self.fast.size(self._key(rel))
            self.fs.invalidate_cache(self.path(rel))
            return int(self.fs.info(self.path(rel))["size"])
        return self._call(f"stat of {rel}", go) if retry else go()

    def exists(self, rel: str) -> bool:
        """Whether the object ``rel`` exists (a file, not a prefix)."""
        if self.known_absent(rel):
            return False

        def go() -> bool:
            if self.fast is not None:
                try:
                    self.fast.size(self._key(rel))
                    return True
                except FileNotFoundError:
                    return False
            self.fs.invalidate_cache(self.path(rel))
            return bool(self.fs.exists(self.path(rel)))
        return self._call(f"stat of {rel}", go)

    def rm(self, rel: str, *, recursive: bool = False) -> None:
        def go() -> None:
            try:
                self.fs.rm(self.path(rel), recursive=recursive)
            except FileNotFoundError:
                pass
        self._call(f"delete of {rel}", go)

    def rm_many(self, rels: list[str]) -> None:
        """Delete several objects; missing ones are fine (S3: one request per 1,000 keys)."""
        if not rels:
            return

        def go() -> None:
            if self.is_local:
                dirs = set()
                for rel in rels:
                    try:
                        self.fs.rm_file(self.path(rel))
                    except FileNotFoundError:
                        pass
                    while "/" in rel:  # and the dirs this leaves empty (never the root)
                        rel = rel.rsplit("/", 1)[0]
                        dirs.add(rel)
                for d in sorted(dirs, key=len, reverse=True):
                    try:
                        os.rmdir(self.path(d))
                    except OSError:
                        pass
            else:
                self.fs.rm([self.path(rel) for rel in rels])
        self._call(f"delete of {len(rels)} objects", go)

    def put_data(self, rel: str, data: bytes) -> int:
        """Upload ``data`` as object ``rel`` (overwriting it) and confirm its size."""
        def go() -> int:
            if self.fast is not None and self.fast.put_confirmed(self._key(rel), data):
                return len(data)
            if self.fast is None:
                self.fs.pipe_file(self.path(rel), data)
            got = self.size(rel, retry=False)
            if got != len(data):
                raise OSError(f"uploaded {rel} has {got} bytes, expected {len(data)}")
            return got
        return self._call(f"upload of {rel}", go)

    def list_keys(self, under: str = "") -> list[str]:
        """Every object key under the prefix that starts with ``under``, relative to the
        prefix, exactly as stored (keys with ``//``, folder markers ending in ``/`` and a
        key beside a "dir" of the same name included): for the watched dir and for naming
        foreign objects, where an s3fs listing would interpret them."""
        if self.fast is not None:
            _, _, base = self.root.partition("/")
            base = base.rstrip("/") + "/" if base else ""
            keys = self._call("listing", lambda: self.fast.list_keys(base + under))
            return [k[len(base):] for k in keys if k.startswith(base)]
        if not self.is_local:
            return [k for k in self.find() if k.startswith(under)]

        def walk() -> list[str]:
            top = self.root
            out: list[str] = []
            for d, _dirs, names in os.walk(top):
                rel_d = os.path.relpath(d, top)
                for n in names:
                    rel = n if rel_d == "." else f"{rel_d}/{n}".replace(os.sep, "/")
                    if rel.startswith(under):
                        out.append(rel)
            return out
        return self._call("listing", walk)

    def find(self, under: str = "") -> dict[str, int]:
        """Every object under the prefix (or its subdir ``under``): relative key -> size."""
        def go() -> dict[str, int]:
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(self.path(under), detail=True)
            except FileNotFoundError:
                return {}
            out = {}
            for p, info in found.items():
                p = p.rstrip("/")
                rel = p[len(self.root) + 1:] if p.startswith(self.root + "/") else None
                if rel and info.get("type", "file") == "file":
                    out[rel] = int(info.get("size") or 0)
            return out
        return self._call("listing", go)
