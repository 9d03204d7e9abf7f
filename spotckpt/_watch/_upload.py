"""One version of a watched file to the remote, verified unchanged while it was read.

Sync layer (no ML imports). The bytes sent are checksummed as they are read (small files:
read once, hashed and PUT from memory; big ones: uploaded while another thread hashes
them), and the file's signature (identity, size, mtime, ctime) must be the same before the
read and after it, or the version is :class:`Torn` and not committed. Whether the file was
also closed is the caller's check (:mod:`._closed`, :mod:`._watcher`).
"""
from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

from spotckpt._commit import file_digest, hasher
from spotckpt._remote import RemoteStore

from ._closed import SETTLE_NS, Torn, emptied, sig
from ._fileset import Entry

_SMALL = 8 << 20     # files up to this size are read once, hashed and PUT from memory


def upload_version(store: RemoteStore, root: Path, rel: str, key: str, unit: str | None, *,
                   settle: bool = False, seen: tuple[int, int, int, int] | None = None,
                   ) -> tuple[Entry, tuple[int, int, int, int]]:
    """Upload the version of ``root/rel`` now in the dir as object ``key``, and return its
    set entry (part of the directory checkpoint ``unit``, if any) and the signature it had
    before its read.

    Args:
        settle: wait (up to 1 s) for a just-emptied file to settle, instead of refusing it.
        seen: the signature the file had before the caller checked that nobody writes it.
            The version read must still have it: a ``write()`` sets the file's times when
            it begins, then copies its bytes, so one begun after that check (by a writer
            that opened the file after it) and still copying during the read leaves the
            same signature before and after the read, and the writer may have closed by
            the check after it.

    Raises:
        Torn: the file changed while it was read or uploaded, is no longer a regular file,
            or was just emptied; what was uploaded is not to be committed.
    """
    full = root / rel
    st1 = os.stat(full, follow_symlinks=False)
    if not stat.S_ISREG(st1.st_mode):  # replaced meanwhile (a FIFO would block the read)
        raise Torn(f"{rel} is no longer a regular file")
    if emptied(st1) and settle:
        time.sleep(min(1.0, max(0.0, st1.st_mtime_ns + SETTLE_NS - time.time_ns()) / 1e9) + 0.01)
        st1 = os.stat(full, follow_symlinks=False)
    if emptied(st1):
        raise Torn(f"{rel} was just emptied (a writer may be opening it)")
    if seen is not None and sig(st1) != seen:
        raise Torn(f"{rel} changed since the check for writers")
    if st1.st_size <= _SMALL:
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even on a FIFO
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise Torn(f"{rel} is no longer a regular file")
            data = f.read()
        h = hasher()
        h.update(data)
        digest = h.hexdigest()
        st2 = os.stat(full, follow_symlinks=False)
        if sig(st1) != sig(st2) or len(data) != st1.st_size:
            raise Torn(f"{rel} changed while it was read")
        store.put_data(key, data)
    else:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(file_digest(full)), daemon=True)
        t.start()
        store.put_file(full, key)
        t.join()
        st2 = os.stat(full, follow_symlinks=False)
        if not out or sig(st1) != sig(st2):
            raise Torn(f"{rel} changed while it was uploaded")
        digest = out[0]
    entry = Entry(path=rel, size=st1.st_size, xxh3=digest, mtime_ns=st1.st_mtime_ns, key=key, unit=unit)
    return entry, sig(st1)
