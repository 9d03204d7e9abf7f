"""Shared plumbing of the framework adapters: lazy framework imports, the options every
adapter passes through to :class:`spotckpt.Checkpointer`, and array (de)serialisation that
loads under both of the core's serialisers."""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Mapping

from spotckpt._cadence import resolve_schedule
from spotckpt._config import _UNSET
from spotckpt._errors import missing
from spotckpt._notices import EXIT_INTERRUPTED, _exit


def require(module: str, package: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`spotckpt.MissingDependencyError` naming the extra.

    Example:
        >>> xgb = require("xgboost", "xgboost", "xgboost")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing(package, extra) from e


def checkpointer_options(*, local_dir: str | os.PathLike[str] | None, remote: Any,
                         keep_last: int | None, grace_seconds: float | None,
                         signals: tuple[int | str, ...] | None,
                         storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :class:`spotckpt.Checkpointer` settings an adapter takes as they are.

    ``remote`` keeps the core's meaning: unset reads ``SPOTCKPT_REMOTE``, ``None`` is local only.
    """
    opts: dict[str, Any] = dict(local_dir=local_dir, keep_last=keep_last, grace_seconds=grace_seconds,
                                signals=signals, storage_options=storage_options)
    if remote is not _UNSET:
        opts["remote"] = remote
    return opts


def schedule_options(*, every: str | None, failure_rate: float | None, mtbf: float | None,
                     min_interval: float | None, max_interval: float | None, every_steps: int | None,
                     every_seconds: float | None, steps_name: str) -> dict[str, Any]:
    """``every="auto"`` and its settings, checked now (the callback's construction) and
    passed through to :class:`spotckpt.Checkpointer`.

    Raises:
        spotckpt.ConfigError: one line naming the setting as the callback calls it
            (``steps_name``: ``every_n_batches``, ...).
    """
    resolve_schedule(every=every, failure_rate=failure_rate, mtbf=mtbf, min_interval=min_interval,
                     max_interval=max_interval, every_steps=every_steps, every_seconds=every_seconds,
                     steps_name=steps_name)
    opts = dict(every=every, failure_rate=failure_rate, mtbf=mtbf, min_interval=min_interval,
                max_interval=max_interval)
    return {k: v for k, v in opts.items() if v is not None}


UNSET: Any = _UNSET


def interrupted_exit(ckpt: Any) -> SystemExit:
    """What an adapter raises to end the process with 143 after its interruption save.

    After a notice: a :class:`spotckpt._notices._exit.Leaving`, armed with the notice's deadline. Not
    caught, it ends the process once the ``atexit`` handlers ran (no interpreter teardown,
    which CPU load stretches past the deadline), and a watchdog ends it 1 s before the
    deadline in any case; caught (a test, a notebook), it is a plain ``SystemExit(143)``.
    """
    notice = getattr(ckpt, "notice", None)
    if notice is None:
        return SystemExit(EXIT_INTERRUPTED)
    _exit.arm(notice.deadline, EXIT_INTERRUPTED, clock=ckpt.clock)
    return _exit.Leaving(EXIT_INTERRUPTED)


# -- arrays -------------------------------------------------------------------------------
# The core's snapshot encodes what an adapter's state_dict() returns (spotckpt._state._values: numpy
# arrays, RNG states, dataclasses, ... load under both serialisers, and anything it could not
# restore is refused at the save). Variables are still kept as plain (dtype, shape, bytes)
# records: they cost one copy, which the snapshot needs anyway, and depend on no pickling.
def pack_array(a: Any) -> dict[str, Any]:
    import numpy as np

    a = np.asarray(a, order="C")  # (not ascontiguousarray, which makes 0-d arrays 1-d)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(rec: Mapping[str, Any]) -> Any:
    import numpy as np

    return np.frombuffer(rec["data"], dtype=np.dtype(rec["dtype"])).reshape(rec["shape"]).copy()
