"""The manifest: the file written last that makes a checkpoint exist.

A checkpoint is ``step-<12-digit step>/`` with payload files and ``MANIFEST.json``. The
manifest lists every payload file with its size and checksum, plus step, time, host/rank
and versions.

Checksums: format ``spotckpt/2`` (written since 0.2) uses XXH3-128 (``xxhash``), which runs
at ~27 GB/s here against SHA-256's ~2 GB/s; on a 1 GiB checkpoint SHA-256 was half a second
of a core per save and per restore (bench/). The checksum guards against corruption and
truncation (disks, transfers, partial writes), not against an attacker who can write the
bucket: such a party could rewrite the manifest as easily as the payload. Manifests of
format ``spotckpt/1`` (SHA-256) are still read and verified. Manifests read from a remote are untrusted input: paths are checked so that
nothing can point outside the checkpoint dir.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from spotckpt._errors import CorruptCheckpointError

MANIFEST = "MANIFEST.json"
FORMAT = "spotckpt/2"
READS = ("spotckpt/1", FORMAT)
ALGO = "xxh3_128"  # what new manifests use
_DIGEST_RE = {"xxh3_128": re.compile(r"[0-9a-f]{32}"), "sha256": re.compile(r"[0-9a-f]{64}")}
_STEP_RE = re.compile(r"^step-(\d{12})$")
MAX_STEP = 10**12 - 1  # step dir names have 12 digits (sorting by name sorts by step)
_MAX_FILE_SIZE = 1 << 44  # 16 TiB: anything larger in a manifest is hostile or broken
_CHUNK = 256 << 10


def rank_dirname(rank: int) -> str:
    """``rank-00003`` for rank 3: a rank's part of a multi-rank checkpoint."""
    return f"rank-{rank:05d}"


def step_dirname(step: int) -> str:
    """``step-000000000042`` for step 42."""
    if step < 0 or step > MAX_STEP:
        raise ValueError(f"step {step} out of range")
    return f"step-{step:012d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a checkpoint dir name, or None if ``name`` is not one."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def check_relpath(rel: str) -> str:
    """Reject paths that could escape a checkpoint dir (``..``, absolute, odd characters)."""
    p = PurePosixPath(rel)
    if (not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or p.is_absolute()
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise CorruptCheckpointError(f"spotckpt: manifest names an unsafe path {rel!r}; refusing it")
    return rel


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    digest: str
    algo: str = ALGO

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, self.algo: self.digest}


@dataclasses.dataclass(frozen=True)
class Manifest:
    step: int
    files: tuple[FileEntry, ...]
    created: float
    host: str
    rank: int
    world_size: int
    framework: str
    serializer: str
    versions: dict[str, str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        d = {
            "format": FORMAT,
            "step": self.step,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "host": self.host,
            "rank": self.rank,
            "world_size": self.world_size,
            "framework": self.framework,
            "serializer": self.serializer,
            "versions": self.versions,
            "files": [f.to_dict() for f in self.files],
            "extra": self.extra,
        }
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, expect_step: int | None = None) -> Manifest:
        """Parse and validate a manifest (untrusted input).

        Raises:
            CorruptCheckpointError: invalid JSON, unknown format, unsafe paths, absurd sizes.
        """
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            if d.get("format") not in READS:
                raise ValueError(f"unknown format {d.get('format')!r} (this spotckpt reads {', '.join(READS)};"
                                 " was it written by a newer version?)")
            step = d["step"]
            if not isinstance(step, int) or step < 0:
                raise ValueError(f"bad step {step!r}")
            if expect_step is not None and step != expect_step:
                raise ValueError(f"manifest says step {step}, its dir says {expect_step}")
            files = []
            seen = set()
            for f in d["files"]:
                path, size = f["path"], f["size"]
                algos = [a for a in _DIGEST_RE if a in f]
                if len(algos) != 1:
                    raise ValueError(f"no single checksum for {path!r}")
                algo = algos[0]
                digest = f[algo]
                if not isinstance(path, str) or path == MANIFEST or path in seen:
                    raise ValueError(f"bad or repeated file {path!r}")
                check_relpath(path)
                if not isinstance(size, int) or not 0 <= size <= _MAX_FILE_SIZE:
                    raise ValueError(f"bad size {size!r} for {path!r}")
                if not isinstance(digest, str) or not _DIGEST_RE[algo].fullmatch(digest):
                    raise ValueError(f"bad checksum for {path!r}")
                seen.add(path)
                files.append(FileEntry(path, size, digest, algo))
            dirs = {"/".join(p.split("/")[:i]) for p in seen for i in range(1, p.count("/") + 1)}
            if dirs & seen:
                raise ValueError(f"{sorted(dirs & seen)[0]!r} is listed both as a file and as a dir")
            return cls(
                step=step, files=tuple(files), created=float(d.get("created", 0.0)),
                host=str(d.get("host", "")), rank=int(d.get("rank", 0)),
                world_size=int(d.get("world_size", 1)), framework=str(d.get("framework", "")),
                serializer=str(d.get("serializer", "")),
                versions={str(k): str(v) for k, v in dict(d.get("versions", {})).items()},
                extra=dict(d.get("extra", {})),
            )
        except CorruptCheckpointError:
            raise
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
            # (OverflowError: int(1e400); RecursionError: deeply nested JSON)
            raise CorruptCheckpointError(f"spotckpt: invalid manifest: {type(e).__name__}: {e}"[:300]) from e


def hasher(algo: str = ALGO) -> Any:
    """A fresh hash object for ``algo`` (``update``/``hexdigest``)."""
    if algo == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algo == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum {algo!r}")


def file_digest(path: str | os.PathLike[str], algo: str = ALGO) -> str:
    # One small buffer, reused: a fresh multi-MiB bytes per read pays page faults, and a
    # buffer that stays in cache hashes faster (bench/).
    h = hasher(algo)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def build_manifest(step: int, entries: Iterable[FileEntry], *, framework: str, serializer: str,
                   rank: int = 0, world_size: int = 1, extra: dict[str, Any] | None = None) -> Manifest:
    from spotckpt._version import __version__

    versions = {"spotckpt": __version__, "python": platform.python_version()}
    for mod in ("torch", "lightning", "keras", "xgboost", "numpy"):
        m = __import__("sys").modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            versions[mod] = str(m.__version__)
    return Manifest(step=step, files=tuple(sorted(entries, key=lambda e: e.path)), created=time.time(),
                    host=socket.gethostname(), rank=rank, world_size=world_size, framework=framework,
                    serializer=serializer, versions=versions, extra=dict(extra or {}))


def verify_dir(path: Path, manifest: Manifest) -> None:
    """Check every file of ``manifest`` in ``path`` by size then checksum.

    Raises:
        CorruptCheckpointError: naming the first bad file.
    """
    for e in manifest.files:
        p = path / e.path
        if p.is_symlink():
            raise CorruptCheckpointError(f"spotckpt: {p} is a symlink; refusing it")
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpointError(f"spotckpt: {p} is missing") from None
        if size != e.size:
            raise CorruptCheckpointError(f"spotckpt: {p} has {size} bytes, manifest says {e.size}")
        if file_digest(p, e.algo) != e.digest:
            raise CorruptCheckpointError(f"spotckpt: {p} fails its checksum")
