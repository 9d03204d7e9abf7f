"""The manifest: the file written last that makes a checkpoint exist.

A checkpoint is ``step-<12-digit step>/`` with payload files and ``MANIFEST.json``. The
manifest lists every payload file with size and SHA-256, plus step, time, host/rank and
versions. Manifests read from a remote are untrusted input: paths are checked so that
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
from typing import IO, Any, Iterable

from ._errors import CorruptCheckpointError

MANIFEST = "MANIFEST.json"
FORMAT = "spotckpt/1"
_STEP_RE = re.compile(r"^step-(\d{12})$")
_MAX_FILE_SIZE = 1 << 44  # 16 TiB: anything larger in a manifest is hostile or broken
_CHUNK = 256 << 10


def step_dirname(step: int) -> str:
    """``step-000000000042`` for step 42."""
    if step < 0 or step >= 10**12:
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
    sha256: str


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
            "files": [dataclasses.asdict(f) for f in self.files],
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
            if d.get("format") != FORMAT:
                raise ValueError(f"unknown format {d.get('format')!r} (this spotckpt reads {FORMAT})")
            step = d["step"]
            if not isinstance(step, int) or step < 0:
                raise ValueError(f"bad step {step!r}")
            if expect_step is not None and step != expect_step:
                raise ValueError(f"manifest says step {step}, its dir says {expect_step}")
            files = []
            seen = set()
            for f in d["files"]:
                path, size, digest = f["path"], f["size"], f["sha256"]
                if not isinstance(path, str) or path == MANIFEST or path in seen:
                    raise ValueError(f"bad or repeated file {path!r}")
                check_relpath(path)
                if not isinstance(size, int) or not 0 <= size <= _MAX_FILE_SIZE:
                    raise ValueError(f"bad size {size!r} for {path!r}")
                if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ValueError(f"bad checksum for {path!r}")
                seen.add(path)
                files.append(FileEntry(path, size, digest))
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


def sha256_file(path: str | os.PathLike[str]) -> str:
    # One small buffer, reused: a fresh multi-MiB bytes per read pays page faults, and a
    # buffer that stays in cache hashes ~30% faster (bench/).
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class HashingWriter:
    """A binary file wrapper that hashes and counts what is written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self._h.update(mv)
        self.size += mv.nbytes
        return self._f.write(mv)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def build_manifest(step: int, entries: Iterable[FileEntry], *, framework: str, serializer: str,
                   rank: int = 0, world_size: int = 1, extra: dict[str, Any] | None = None) -> Manifest:
    from . import __version__

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
        if sha256_file(p) != e.sha256:
            raise CorruptCheckpointError(f"spotckpt: {p} fails its checksum")
