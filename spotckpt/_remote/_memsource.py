"""What a streamed part is read from: a payload's bytes in memory (uploaded while its
local copy is written), or the file. Sync layer.

The ``safetensors`` writer (``spotckpt._state._tensorfile``) knows every byte of the file
before it writes the first one: a header, then the snapshot's buffers. It hands them to the
checkpoint's :class:`~._stream.StreamUpload` as a :class:`Memory` (memoryviews, no copy),
and the multipart upload sends slices of them while the same bytes go to the local file:
nothing is read back from the file. Before the writer returns (and the training thread may
refill the snapshot buffers) it calls :meth:`Memory.release`, which waits for the parts
being sent from memory; parts not yet started are then read from the file, complete by then
and holding the very same bytes.
"""
from __future__ import annotations

import bisect
import os
import threading
from typing import Any, Iterable

# At least this many bytes per read() (as _stream.PartReader): one GIL round trip per block.
_BLOCK = 1 << 20


class Memory:
    """The bytes of one file as consecutive segments (``size`` in all)."""

    def __init__(self, segments: Iterable[Any], size: int) -> None:
        self.segs = [memoryview(s).cast("B") for s in segments]
        self.starts: list[int] = []
        pos = 0
        for s in self.segs:
            self.starts.append(pos)
            pos += len(s)
        if pos != size:
            raise ValueError(f"segments hold {pos} bytes, not {size}")
        self.size = size
        self._cv = threading.Condition()
        self._readers = 0
        self._released = False

    def reader(self, offset: int, length: int) -> _MemReader | None:
        """A file-like view of ``length`` bytes from ``offset``, or None once released (read
        the file instead). Call :meth:`done` when the request that read it has returned."""
        with self._cv:
            if self._released:
                return None
            self._readers += 1
        return _MemReader(self, offset, length)

    def done(self) -> None:
        with self._cv:
            self._readers -= 1
            self._cv.notify_all()

    def release(self) -> None:
        """No new reader; wait for those in use (the writer may then reuse the buffers)."""
        with self._cv:
            self._released = True
            self._cv.wait_for(lambda: self._readers == 0)
            self.segs = []  # (views of buffers that may be freed next)

    @property
    def released(self) -> bool:
        return self._released

    def read_at(self, offset: int, n: int) -> memoryview:
        """Up to ``n`` bytes at ``offset``, within one segment (a view, no copy)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        while i < len(self.segs) - 1 and offset - self.starts[i] >= len(self.segs[i]):
            i += 1  # (empty segments)
        seg, at = self.segs[i], offset - self.starts[i]
        return seg[at:at + n]

    def copy(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` as one bytes object (a small file's single PUT)."""
        out, pos = bytearray(), offset
        while pos < offset + length:
            v = self.read_at(pos, offset + length - pos)
            if not v:
                raise ValueError(f"no bytes at {pos}")
            out += v
            pos += len(v)
        return bytes(out)


# Bytes per read of a part read from the file while it is sent. Kept below glibc's mmap threshold (128 KiB):
# 1 MiB blocks were mmapped and unmapped per read, and the page faults and mmap-lock
# traffic slowed the writer thread five-fold (bench/).
_FILE_BLOCK = 64 << 10


class PartReader:
    """A read-only file over ``length`` bytes of ``fd`` from ``offset``, read with pread
    (no shared file position, so parts are read by several threads at once)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd, self._offset, self._len, self._pos = fd, offset, length, 0

    def read(self, amt: int | None = None) -> bytes:
        # At least _FILE_BLOCK bytes per call, whatever ``amt`` asks: http.client's send loop and
        # botocore's checksum take blocks of any size, and 16 KiB at a time meant a GIL round
        # trip per 16 KiB, which delays the training thread (bench/ row 2r).
        left = self._len - self._pos
        n = left if amt is None or amt < 0 else min(max(amt, _FILE_BLOCK), left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._offset + self._pos)
        if not data:
            raise OSError(f"unexpected end of file at {self._offset + self._pos}")
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._len

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


class _MemReader:
    """A read-only, seekable file over part of a :class:`Memory`; ``read`` returns views."""

    def __init__(self, mem: Memory, offset: int, length: int) -> None:
        self._mem, self._offset, self._len, self._pos = mem, offset, length, 0

    def read(self, amt: int | None = None) -> Any:
        left = self._len - self._pos
        n = left if amt is None or amt < 0 else min(max(amt, _BLOCK), left)
        if n <= 0:
            return b""
        if amt is None or amt < 0:
            data: Any = self._mem.copy(self._offset + self._pos, n)  # read all: one object
        else:
            data = self._mem.read_at(self._offset + self._pos, n)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._len

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True
