"""Settings: arguments, then ``SPOTCKPT_*`` environment variables, then defaults.

Everything is validated in :meth:`Config.resolve` so a wrong setting fails before the first
training step, as one line that names the setting and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import signal
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from spotckpt._cadence import CADENCE_ENV as _CADENCE_ENV, Schedule, resolve_schedule
from spotckpt._errors import ConfigError, LocalDirError

LINEAGE_PREFIX = "ckpt-"  # a named Checkpointer's dir: <local_dir>/ckpt-<name>/, <remote>/ckpt-<name>/

DEFAULT_LOCAL_DIR = "/opt/ml/checkpoints"  # SageMaker's CheckpointConfig.LocalPath
DEFAULT_KEEP_LAST = 2
DEFAULT_GRACE = 30.0
SAGEMAKER_GRACE = 120.0  # SageMaker gives two minutes between SIGTERM and SIGKILL

_UNSET: Any = object()
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def on_sagemaker(env: Mapping[str, str] | None = None) -> bool:
    """True inside a SageMaker training container (it sets these variables)."""
    env = os.environ if env is None else env
    return any(k in env for k in ("SM_TRAINING_ENV", "TRAINING_JOB_NAME", "SM_CURRENT_HOST"))


@dataclasses.dataclass(frozen=True)
class Config:
    """Resolved, validated settings.

    Example:
        >>> cfg = Config.resolve(local_dir="/tmp/ck", remote="file:///tmp/remote/")  # doctest: +SKIP
    """

    local_dir: Path
    remote: str | None
    keep_last: int
    every_steps: int | None
    every_seconds: float | None
    grace_seconds: float
    signals: tuple[int, ...]
    storage_options: dict[str, Any]
    name: str | None = None  # a named lineage: <local_dir>/ckpt-<name>/ and <remote>ckpt-<name>/
    schedule: Schedule | None = None  # every="auto": its settings (None: a fixed cadence)

    @property
    def lineage_remote(self) -> str | None:
        """The remote URL this lineage's checkpoints go to (``remote`` when unnamed)."""
        if self.remote is None or self.name is None:
            return self.remote
        return f"{self.remote}{LINEAGE_PREFIX}{self.name}/"

    @classmethod
    def resolve(
        cls,
        *,
        local_dir: str | os.PathLike[str] | None = None,
        remote: str | None = _UNSET,
        keep_last: int | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        grace_seconds: float | None = None,
        signals: tuple[int | str, ...] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        name: str | None = None,
        every: str | None = None,
        failure_rate: float | None = None,
        mtbf: float | None = None,
        min_interval: float | None = None,
        max_interval: float | None = None,
        env: Mapping[str, str] | None = None,
        check_local: bool = True,
    ) -> Config:
        """Merge arguments, environment and defaults, and validate the result.

        Args:
            remote: an fsspec URL; ``None`` explicitly means local only; unset reads
                ``SPOTCKPT_REMOTE``.
            name: a lineage name (``Checkpointer(name=)``, ``--name``); no variable: one
                value for every Checkpointer of a process would be the collision it avoids.
            every, failure_rate, mtbf, min_interval, max_interval: ``every="auto"`` and its
                settings (:func:`resolve_schedule`).
            check_local: create the local dir and probe that it is writable.

        Raises:
            ConfigError: a value is invalid.
            LocalDirError: the local dir cannot be created or written.
        """
        env = os.environ if env is None else env

        def pick(arg: Any, name: str) -> Any:
            if arg is not None and arg is not _UNSET:
                return arg
            return env.get(name) or None

        ld = pick(local_dir, "SPOTCKPT_LOCAL_DIR") or DEFAULT_LOCAL_DIR
        rem = env.get("SPOTCKPT_REMOTE") or None if remote is _UNSET else remote
        sched = resolve_schedule(every=every, failure_rate=failure_rate, mtbf=mtbf, min_interval=min_interval,
                                 max_interval=max_interval, every_steps=every_steps,
                                 every_seconds=every_seconds, env=env)
        if sched is not None:  # auto: no fixed cadence from the variables (the argument decided)
            env = {k: v for k, v in env.items() if k not in _CADENCE_ENV}
        cfg = cls(
            local_dir=Path(ld).expanduser().absolute(),
            remote=_check_remote(rem),
            keep_last=_int("keep_last", pick(keep_last, "SPOTCKPT_KEEP_LAST"), DEFAULT_KEEP_LAST, minimum=1),
            every_steps=_int("every_steps", pick(every_steps, "SPOTCKPT_EVERY_STEPS"), None, minimum=1),
            every_seconds=_float("every_seconds", pick(every_seconds, "SPOTCKPT_EVERY_SECONDS"), None),
            grace_seconds=_float(
                "grace_seconds",
                pick(grace_seconds, "SPOTCKPT_GRACE_SECONDS"),
                SAGEMAKER_GRACE if on_sagemaker(env) else DEFAULT_GRACE,
            ),
            signals=_signals(signals if signals is not None else env.get("SPOTCKPT_SIGNALS")),
            storage_options=dict(storage_options or {}),
            name=_name(name),
            schedule=sched,
        )
        if check_local:
            probe_local_dir(cfg.local_dir)
        return cfg


def _int(name: str, value: Any, default: int | None, *, minimum: int) -> int | None:
    if value is None:
        return default
    try:
        n = int(value)
        if str(n) != str(value).strip() and not isinstance(value, int):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"spotckpt: {name}={value!r} is not a whole number; "
                          f"pass an integer >= {minimum} (or SPOTCKPT_{name.upper()})") from None
    if n < minimum:
        raise ConfigError(f"spotckpt: {name}={n} must be >= {minimum}; "
                          f"fix the argument or SPOTCKPT_{name.upper()}")
    return n


def _float(name: str, value: Any, default: float | None, *, var: str | None = None) -> float | None:
    if value is None:
        return default
    var = var or f"SPOTCKPT_{name.upper()}"
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"spotckpt: {name}={value!r} is not a number of seconds; "
                          f"fix the argument or {var}") from None
    if not x > 0 or x == float("inf"):
        raise ConfigError(f"spotckpt: {name}={value!r} must be a positive number of seconds; "
                          f"fix the argument or {var}")
    return x


def _name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(f"spotckpt: name={value!r} is not a valid checkpointer name; use 1-64 "
                          "letters, digits, '_' or '-', starting with a letter or digit (e.g. 'ema')")
    return value


def _signals(value: Any) -> tuple[int, ...]:
    if value is None or value == "":
        return (int(signal.SIGTERM),)
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[int] = []
    for item in items:
        if isinstance(item, int):
            out.append(int(item))
            continue
        name = str(item).strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or name.startswith("SIG_"):
            raise ConfigError(f"spotckpt: signals: unknown signal {item!r}; "
                              "use names such as SIGTERM,SIGUSR1 (SPOTCKPT_SIGNALS)")
        out.append(int(sig))
    return tuple(dict.fromkeys(out))


def _check_remote(url: str | None) -> str | None:
    if url is None:
        return None
    url = str(url).strip()
    if not url:
        return None
    if url.startswith("/"):
        url = "file://" + url
    if "://" not in url:
        raise ConfigError(f"spotckpt: remote={url!r} is not a URL; use s3://bucket/prefix/, "
                          "file:///path/ or another fsspec URL (SPOTCKPT_REMOTE)")
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("s3", "s3a"):
        # s3fs is found, not imported: a restore's first byte does not wait for its import
        # (~0.15 s with aiobotocore and aiohttp); RemoteStore imports it on first listing.
        import importlib.util

        if importlib.util.find_spec("s3fs") is None:
            raise ConfigError(f"spotckpt: remote={url!r}: the '{scheme}' filesystem needs a package "
                              "that is not installed (pip install s3fs)")
    else:
        import fsspec  # local import: config must stay cheap to import

        try:
            fsspec.get_filesystem_class(scheme)
        except ValueError:
            raise ConfigError(f"spotckpt: remote={url!r}: unknown URL scheme '{scheme}://'; "
                              "use s3://, file:// or an installed fsspec protocol") from None
        except ImportError as e:
            raise ConfigError(f"spotckpt: remote={url!r}: the '{scheme}' filesystem needs a package "
                              f"that is not installed ({e})") from None
    if scheme == "s3":
        rest = url.split("://", 1)[1]
        if not rest.split("/", 1)[0]:
            raise ConfigError(f"spotckpt: remote={url!r} has no bucket; use s3://bucket/prefix/")
    return url.rstrip("/") + "/"


def require_dir(path: Path, *, must_exist: bool = False) -> None:
    """Check that ``path`` is a directory, or could be made one (``must_exist``: is one).

    Raises:
        LocalDirError: ``path`` (or a parent of it) is a file, or it is missing and
            ``must_exist``; one line naming the dir.
    """
    # One look (stat), not two: the ranks of a job start at once on one dir, and a dir another
    # process creates between an is_dir() and an exists() is not "not a directory".
    try:
        is_dir = stat.S_ISDIR(path.stat().st_mode)
        found = True
    except (FileNotFoundError, NotADirectoryError):
        is_dir, found = False, path.is_symlink()  # (a dangling symlink)
    if is_dir:
        return
    if found:
        raise LocalDirError(f"spotckpt: local_dir '{path}' is not a directory; "
                            "pass a directory as --local-dir / local_dir= or SPOTCKPT_LOCAL_DIR")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LocalDirError(f"spotckpt: local_dir '{path}' cannot be a directory: '{parent}' is a file; "
                            "pass another --local-dir / local_dir= or SPOTCKPT_LOCAL_DIR")
    if must_exist:
        raise LocalDirError(f"spotckpt: local_dir '{path}' does not exist; "
                            "pass the directory the checkpoints are in (--local-dir or SPOTCKPT_LOCAL_DIR)")


def probe_local_dir(path: Path) -> None:
    """Create ``path`` and check a file can be written, synced and removed there.

    Raises:
        LocalDirError: naming the dir and what to do.
    """
    require_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".spotckpt-probe-{uuid.uuid4().hex}.sagemaker-ignore"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise LocalDirError(
            f"spotckpt: local_dir '{path}' is not writable ({e.strerror or e}); "
            "pass a writable local_dir= or set SPOTCKPT_LOCAL_DIR"
        ) from e


# What `spotckpt run` tells its command (JSON: the dir it watches, its remote, the generation
# of the job it claimed); read by spotckpt/_checkpointer/_supervised.py.
SUPERVISOR_ENV = "SPOTCKPT_SUPERVISOR"


def supervised(env: Mapping[str, str] | None = None) -> bool:
    """True when running under ``spotckpt run``, which owns the uploads."""
    return (os.environ if env is None else env).get("SPOTCKPT_SUPERVISED") == "1"


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, integer: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number (no NaN, no inf) in the given bounds: a bad
    value is a usage error (one line, exit status 2) before anything starts.

    Example:
        >>> p.add_argument("--grace", type=number(gt=0))  # doctest: +SKIP
    """
    kind = "a whole number" if integer else "a finite number"
    bounds = " and ".join(f"{op} {v:g}" for op, v in ((">", gt), (">=", ge), ("<", lt), ("<=", le))
                          if v is not None)
    rule = f"must be {kind}" + (f" {bounds}" if bounds else "")

    def parse(text: str) -> float:
        try:
            v: float = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if integer else 'a number'}") from None
        if (math.isnan(v) or math.isinf(v) or (gt is not None and not v > gt)
                or (ge is not None and not v >= ge) or (lt is not None and not v < lt)
                or (le is not None and not v <= le)):
            raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
        return v
    return parse
