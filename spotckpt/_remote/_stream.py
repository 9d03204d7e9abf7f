"""Upload a payload file while it is still being written. Sync layer: no ML imports.

Serialising 1 GiB and checksumming it takes seconds; uploading it, several more. Done one
after the other, the upload starts only once the local commit is done. A
:class:`StreamUpload` follows the file as the writer appends to it and sends each part of a
multipart upload as soon as the writer is past it, so by the time the checkpoint is
committed locally most of its bytes are already on S3. The remote commit protocol is
unchanged: the Syncer still confirms the object's size and writes ``MANIFEST.json`` last;
it merely finds the payload already there (:meth:`RemoteStore.put_file`).

Only files their writer produces strictly front to back may be streamed (``torch.save``
and ``pickle.dump`` into an open file do); a writer that seeks back and patches a header
would leave the remote copy different from the local one.

A writer that holds the whole file in memory before writing it (the ``safetensors`` payload)
hands it over with :meth:`StreamUpload.feed`: the parts are then sent from that memory,
beside the local write rather than after it (:mod:`._memsource`).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from spotckpt._events import log

from ._memsource import Memory, PartReader
from ._s3fast import CONCURRENCY, PART_SIZE, S3Fast

_POLL = 0.005  # seconds between looks at how far the writer got
_PIN_WAIT = 2.0  # seconds the writer waits, at most, for the stream to take its first parts from memory


class StreamUpload:
    """A multipart upload of ``path`` that keeps up with its writer.

    Example:
        >>> up = StreamUpload(fast, "run/step-000000000100/state.pt", tmp / "state.pt")  # doctest: +SKIP
        >>> ...  # the writer writes and closes the file
        >>> up.finish(size); up.wait(); up.matches(final_path)
    """

    def __init__(self, fast: S3Fast, key: str, path: Path, *, part: int = PART_SIZE,
                 guard: str | None = None, committed: Path | None = None) -> None:
        self.fast, self.key, self.path, self.part, self.guard = fast, key, path, part, guard
        self.committed = committed  # where the file is after its dir is renamed into place
        self.guard_absent = threading.Event()  # the guard key was checked: it does not exist
        self._final: int | None = None        # set by finish(): the writer is done
        self._cancel = threading.Event()
        self._wake = threading.Event()         # finish() or abort() happened
        self._upload_id: str | None = None
        self._mem: Memory | None = None        # set by feed(): the bytes, in memory
        self._released = threading.Event()     # the writer released them: the file is complete
        self._pinned = threading.Event()       # the first parts (or the one PUT) hold the memory
        self._file_lock = threading.Lock()
        self._file_fd: int | None = None       # the complete file, for parts sent after the release
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.identity: tuple[int, int, int] | None = None  # (size, inode, mtime_ns) uploaded
        self._thread = threading.Thread(target=self._run, name="spotckpt-stream", daemon=True)
        self._thread.start()

    # -- the writer's side -------------------------------------------------------------------
    def finish(self, size: int) -> None:
        """The writer is done with the file at ``size`` bytes: send the rest and complete.
        Called again with another size (the file changed after all), the stream gives up."""
        if self._final is not None and self._final != size:
            self.abort()
            return
        self._final = size
        self._wake.set()

    def feed(self, segments: Any, size: int) -> Callable[[], None]:
        """The file's ``size`` bytes, all in memory (``segments``: buffers, in order), before
        the writer writes them: the upload sends them from there. Returns ``release``, which
        the writer must call once the file is complete and before the buffers change (it
        waits for the parts being sent from them)."""
        mem = Memory(segments, size)
        if self._final is not None and self._final != size:
            self.abort()
        # (not _final: that says the file is complete, for a stream that opened it already)
        self._mem = mem
        self._wake.set()

        def release() -> None:
            # The stream takes its first window of parts from memory, not the file: on a
            # loaded machine the writer often ended before the stream's first request had
            # returned, and every part was read back from the file, twice (checksum, send).
            # Bounded: a remote that does not answer does not hold the writer up.
            self._pinned.wait(_PIN_WAIT)
            mem.release()
            self._released.set()
            self._wake.set()
        return release

    def abort(self) -> None:
        """Give up (the checkpoint was not committed): the stream stops and removes what it
        uploaded, in its own thread (the writer does not wait for the remote)."""
        self._cancel.set()
        self._wake.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- the Syncer's side -------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the stream; True if the whole file went up and its size was confirmed."""
        return self._done.wait(timeout) and self.error is None and self.identity is not None

    def matches(self, local: str | os.PathLike[str]) -> bool:
        """Whether ``local`` is the very file this stream uploaded, unchanged since."""
        try:
            st = os.stat(local)
        except OSError:
            return False
        return self.identity == (st.st_size, st.st_ino, st.st_mtime_ns)

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        client = None
        try:
            if self.guard is not None:
                # Never overwrite the payload of a checkpoint already committed remotely
                # (the Syncer then finds its manifest and leaves it as it is).
                try:
                    self.fast.size(self.guard)
                    raise FileExistsError(f"{self.guard} exists")
                except FileNotFoundError:
                    self.guard_absent.set()
            fd = self._open(memory=True)
            if fd is None:
                return
            try:
                client = self.fast.client
                sent = self._upload(client, None if fd < 0 else fd)
                if sent is None:
                    return  # cancelled before anything was sent
                if fd < 0:  # sent from memory: the identity is the local copy's, once complete
                    while not self._released.wait(_POLL * 20):
                        if self._cancel.is_set():
                            raise InterruptedError("streaming upload cancelled")
                    sent_size = self._mem.size if self._mem is not None else None
                    fd = self._open()
                    if fd is None:
                        return
                    if os.fstat(fd).st_size != sent_size:
                        raise OSError(f"{self.path} is not the {sent_size} bytes sent from memory")
                st = os.fstat(fd)
                # The commit protocol's confirmation, done here: by the PUT's echoed checksum
                # or by a HEAD.
                got = st.st_size if sent == "confirmed" else self.fast.size(self.key)
                if got != st.st_size:
                    raise OSError(f"streamed {self.key} has {got} bytes, expected {st.st_size}")
                if st.st_size != self._final:
                    raise OSError(f"{self.path} has {st.st_size} bytes, {self._final} were sent")
                self.identity = (st.st_size, st.st_ino, st.st_mtime_ns)
            finally:
                if fd is not None and fd >= 0:
                    os.close(fd)
                if self._file_fd is not None:
                    os.close(self._file_fd)
        except BaseException as e:  # noqa: BLE001 - the Syncer falls back to a normal upload
            self.error = e
            log.debug("spotckpt: streaming upload of %s failed (%s); the Syncer will upload it", self.key, e)
            if self._upload_id and client is not None:
                try:
                    client.abort_multipart_upload(Bucket=self.fast.bucket, Key=self.key, UploadId=self._upload_id)
                except Exception:  # noqa: BLE001
                    pass
        finally:
            if self._cancel.is_set() and self.identity is not None:
                self.identity = None
                try:
                    self.fast.delete(self.key)  # aborted after it completed
                except Exception as e:  # noqa: BLE001 - an orphan payload is harmless, just logged
                    log.debug("spotckpt: cleanup of streamed %s failed: %s", self.key, e)
            self._pinned.set()
            self._done.set()

    def _open(self, memory: bool = False) -> int | None:
        """The file, opened (-1: the writer fed its bytes in memory first, with ``memory``)."""
        while not self._cancel.is_set():
            if memory and self._mem is not None:
                return -1
            try:
                fd = os.open(self.path, os.O_RDONLY)
                if memory and self._mem is not None:
                    # fed between the look above and the open: a writer feeds before it
                    # creates the file, so a file that exists was fed if it ever will be
                    os.close(fd)
                    return -1
                return fd
            except FileNotFoundError:
                if self._final is not None:
                    if self.committed is None:
                        raise
                    # Written and committed (renamed into place) before we first looked: the
                    # same file (inode) under its committed name. The Syncer checks that
                    # identity before it trusts this upload.
                    fd = os.open(self.committed, os.O_RDONLY)
                    if os.fstat(fd).st_size != self._final:
                        os.close(fd)
                        raise OSError(f"{self.committed} is not the file that was written")
                    return fd
                self._wake.wait(_POLL)
        return None

    def _written(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def _complete_file(self) -> int:
        """The complete file (for parts sent after the writer released its memory)."""
        with self._file_lock:
            if self._file_fd is None:
                fd = self._open()
                if fd is None:
                    raise InterruptedError("streaming upload cancelled")
                self._file_fd = fd
            return self._file_fd

    def _body(self, offset: int, length: int) -> tuple[Any, Memory | None]:
        """The bytes of a part: from memory while the writer holds it, else from the file."""
        mem = self._mem
        r = mem.reader(offset, length) if mem is not None else None
        if r is not None:
            return r, mem
        return PartReader(self._complete_file(), offset, length), None

    def _upload(self, client: Any, fd: int | None) -> str | None:
        """Send the file part by part as it grows (one PUT if it stays within a part); from
        memory when ``fd`` is None. Returns None if cancelled before anything was sent,
        "confirmed" if the PUT's response confirmed the bytes, else "sent"."""
        part = self.part
        mem_size = self._mem.size if fd is None and self._mem is not None else None

        def final_size() -> int | None:
            return mem_size if mem_size is not None else self._final
        # Wait until the file is known to need more than one part, or is complete.
        while final_size() is None and self._written(fd) <= part:
            self._wake.wait(_POLL)
            if self._cancel.is_set():
                return None
        last = final_size()
        if last is not None and last <= part:
            if fd is None:
                body, mem = self._body(0, last)
                try:
                    data = body.read(last) if mem is None else mem.copy(0, last)
                finally:
                    if mem is not None:
                        mem.done()
                    self._pinned.set()
                return "confirmed" if self.fast.put_confirmed(self.key, bytes(data)) else "sent"
            data = os.pread(fd, self._final, 0)
            if len(data) != self._final:
                raise OSError(f"{self.path}: read {len(data)} of {self._final} bytes")
            return "confirmed" if self.fast.put_confirmed(self.key, data) else "sent"
        bucket, key = self.fast.bucket, self.key
        # As s3transfer does: declare the per-part checksum botocore computes anyway.
        extra = {"ChecksumAlgorithm": "CRC32"} \
            if client.meta.config.request_checksum_calculation == "when_supported" else {}
        upload_id = self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)["UploadId"]
        slots = threading.Semaphore(CONCURRENCY)  # bounds memory: parts in flight x part size
        futures: list[Future] = []

        def send(number: int, offset: int, length: int, body: Any, mem: Memory | None) -> dict[str, Any]:
            # A lazy view of the part, read as botocore sends it (as s3transfer does): a
            # fresh 16 MiB buffer per part pays a page fault per 4 KiB, slow on a VM.
            try:
                resp = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                          Body=body, ContentLength=length, **extra)
                done = {"PartNumber": number, "ETag": resp["ETag"]}
                if "ChecksumCRC32" in resp:
                    done["ChecksumCRC32"] = resp["ChecksumCRC32"]
                return done
            finally:
                if mem is not None:
                    mem.done()
                slots.release()

        with ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="spotckpt-part") as pool:
            offset, number = 0, 1
            while True:
                if self._cancel.is_set():
                    raise InterruptedError("streaming upload cancelled")
                final = final_size()
                avail = final if final is not None else self._written(fd)
                # A part goes once the writer is past it; the last one once the file is closed.
                if avail - offset > part or (final is not None and avail > offset):
                    length = min(part, avail - offset)
                    slots.acquire()
                    # Its bytes are taken now, not when a thread gets to it: a part handed
                    # to the pool holds the writer's memory (whose release waits for it), so
                    # a loaded machine does not read parts back from the file that were
                    # queued while the memory was there (twice each: checksum, then send).
                    body, mem = self._body(offset, length) if fd is None else (PartReader(fd, offset, length), None)
                    try:
                        futures.append(pool.submit(send, number, offset, length, body, mem))
                    except BaseException:
                        if mem is not None:
                            mem.done()
                        slots.release()
                        raise
                    offset, number = offset + length, number + 1
                    if number > CONCURRENCY or offset == final_size():
                        self._pinned.set()  # (the rest waits for slots: from the file, if released)
                    continue
                if final is not None and offset >= final:
                    break
                if any(f.done() and f.exception() is not None for f in futures):
                    break
                self._wake.wait(_POLL)
            parts = [f.result() for f in futures]  # raises the first failed part's error
        if offset != final_size():
            raise OSError(f"{self.path}: streamed {offset} bytes, the writer wrote {final_size()}")
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
        # the object is exactly the parts listed, each answered, which cover the file to its
        # final size (checked above): confirmed without a HEAD (issue 25)
        return "confirmed"


class StreamRegistry:
    """The streams a :class:`RemoteStore` started, by relative key, until the Syncer takes
    them (or they turn out to be superseded).

    Example:
        >>> reg = StreamRegistry(); reg.add("step-000000000100/state.pt", up, guard_rel=None)  # doctest: +SKIP
        >>> reg.take("step-000000000100/state.pt", final_path)
    """

    def __init__(self, keep: int = 8) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[StreamUpload, str | None]] = {}  # rel -> (stream, guard rel)
        self._keep = keep

    def add(self, rel: str, up: StreamUpload, guard_rel: str | None) -> None:
        with self._lock:
            # Forget streams nobody will ask for: aborted ones, and beyond the few newest
            # (a step superseded before the Syncer took it; remote retention removes its data).
            for k in [k for k, (v, _) in self._streams.items() if v.cancelled]:
                del self._streams[k]
            while len(self._streams) >= self._keep:
                del self._streams[next(iter(self._streams))]
            self._streams[rel] = (up, guard_rel)

    def take(self, rel: str, *paths: str | os.PathLike[str], size: int | None = None) -> bool:
        """Whether a stream uploaded ``rel``, confirmed, from the very file now at one of
        ``paths`` (the same inode; ``size`` bytes if given). Taken (forgotten) if so; left
        for a later caller if not."""
        with self._lock:
            entry = self._streams.get(rel)
        if entry is None:
            return False
        up = entry[0]
        if not up.wait() or up.identity is None or (size is not None and up.identity[0] != size):
            return False
        if not any(up.matches(p) for p in paths):
            return False
        with self._lock:
            self._streams.pop(rel, None)
        return True

    def drop_before(self, step: int, timeout: float = 60.0) -> list[str]:
        """Stop and forget the streams of checkpoints older than ``step`` that nobody took
        (their step was superseded before the Syncer got to it), and wait for them: one that
        completed meanwhile leaves its payload. Returns their keys (relative), which the
        caller's retention then deletes."""
        from spotckpt._commit import parse_step_dirname

        with self._lock:
            old = [rel for rel in self._streams
                   if (s := parse_step_dirname(rel.split("/", 1)[0])) is not None and s < step]
            ups = [self._streams.pop(rel)[0] for rel in old]
        for up in ups:
            up.abort()
        for up in ups:
            up.wait(timeout)
        return old

    def checked_absent(self, rel: str) -> bool:
        """Whether a stream's guard just found that ``rel`` does not exist."""
        with self._lock:
            return any(g == rel and up.guard_absent.is_set() for up, g in self._streams.values())

    def written(self, rel: str) -> None:
        """``rel`` was just written: a stream's earlier "absent" answer no longer holds."""
        with self._lock:
            for k, (up, g) in self._streams.items():
                if g == rel:
                    self._streams[k] = (up, None)
