"""The SageMaker contract's transfers: input channels down, ``model.tar.gz`` up.

Sync layer (fsspec through :class:`spotckpt._remote._store.RemoteStore`, no ML imports). SageMaker's
"Downloading" is a job's input channels (and checkpoints) coming down before the container
starts; its "Uploading" is ``/opt/ml/model`` going up as ``model.tar.gz`` (and
``/opt/ml/output/data`` as ``output.tar.gz``) once the job completed. Both report to the
events log (``channel_download``, ``model_uploaded``, ``contract_error``) for the emulator's
report, and draw a progress bar on a terminal.
"""
from __future__ import annotations

import os
import posixpath
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from spotckpt._errors import ConfigError, SpotckptError
from spotckpt._events import EventLog, log
from spotckpt._remote import RemoteStore
from spotckpt._sync import Progress, human_bytes

if TYPE_CHECKING:
    from ._env import Contract


def _objects(url: str) -> tuple[RemoteStore, dict[str, int]]:
    """The store and its objects (relative key -> size) that a channel URL names: every
    object under a prefix, or one object (SageMaker's S3Prefix also matches a single key)."""
    store = RemoteStore(url)
    if not url.endswith("/") and store._call("stat", lambda: store.fs.isfile(store.root)):
        parent, name = posixpath.split(url.rstrip("/"))
        store = RemoteStore(parent + "/")
        return store, {name: int(store.size(name))}
    found = {k: v for k, v in store.find().items() if not k.endswith("/")}
    return store, found


def download_channel(name: str, url: str, dest: Path, events: EventLog | None = None) -> tuple[int, int]:
    """Download channel ``name`` into ``dest``. Returns (files, bytes).

    Raises:
        ConfigError: nothing at ``url`` (SageMaker fails the job the same way).
        RemoteError: the remote failed after retries.
    """
    t0 = time.monotonic()
    store, objs = _objects(url)
    if not objs:
        raise ConfigError(f"spotckpt: channel {name}: no objects found under {url}")
    dest.mkdir(parents=True, exist_ok=True)
    bar = Progress(f"downloading channel {name}")
    bar.set_total(sum(objs.values()))
    store.progress = bar.add
    root = os.path.realpath(dest)
    try:
        for rel in sorted(objs):
            target = os.path.realpath(os.path.join(dest, rel))
            if not target.startswith(root + os.sep):
                log.warning("spotckpt run: channel %s: skipping %r (it would land outside %s)", name, rel, dest)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            store.get_file(rel, target)
    finally:
        store.progress = None
        bar.close()
    size, secs = sum(objs.values()), time.monotonic() - t0
    log.info("spotckpt run: channel %s: %d file(s), %s from %s in %.1f s", name, len(objs),
             human_bytes(size), url, secs)
    if events is not None:
        events.emit("channel_download", channel=name, url=url, files=len(objs), bytes=size, seconds=round(secs, 3))
    return len(objs), size


def download_channels(contract: Contract, events: EventLog | None = None) -> None:
    """Lay out ``/opt/ml`` and download every channel, as SageMaker does before a start."""
    contract.lay_out()
    try:
        for name, url in contract.channels.items():
            download_channel(name, url, contract.channel_dir(name), events)
    except Exception as e:
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        if events is not None:
            events.emit("contract_error", message=line)
        if isinstance(e, SpotckptError):
            raise
        raise ConfigError(f"spotckpt: input channels: {line}") from e  # one line, exit 2


def _tar(src: Path, out: str) -> None:
    with tarfile.open(out, "w:gz") as tar:
        if src.is_dir():
            for entry in sorted(os.listdir(src)):
                tar.add(src / entry, arcname=entry)


def upload_artifacts(contract: Contract, events: EventLog | None = None) -> str | None:
    """Upload ``model.tar.gz`` (always, as SageMaker does) and ``output.tar.gz`` (when
    ``output/data`` holds files) to ``<output_path>/<job>/output/``. Returns the model's URL
    (``ModelArtifacts.S3ModelArtifacts``), None without an output path.

    Raises:
        RemoteError: the upload failed after retries.
    """
    prefix = contract.artifact_prefix
    if prefix is None:
        return None
    store = RemoteStore(prefix)
    model_url = None
    with tempfile.TemporaryDirectory(prefix="spotckpt-artifacts-") as tmp:
        for name, src in (("model.tar.gz", contract.model_dir), ("output.tar.gz", contract.output_data_dir)):
            if name == "output.tar.gz" and not (src.is_dir() and any(src.iterdir())):
                continue
            t0 = time.monotonic()
            path = os.path.join(tmp, name)
            _tar(src, path)
            size = os.path.getsize(path)
            bar = Progress(f"uploading {name}")
            bar.set_total(size)
            store.progress = bar.add
            try:
                store.put_file(path, name)
            finally:
                store.progress = None
                bar.close()
            url = prefix + name
            log.info("spotckpt run: %s: %s (%s, %.1f s)", "model artifact" if name == "model.tar.gz"
                     else "output data", url, human_bytes(size), time.monotonic() - t0)
            if events is not None:
                events.emit("model_uploaded" if name == "model.tar.gz" else "output_uploaded", url=url, bytes=size)
            if name == "model.tar.gz":
                model_url = url
    return model_url


__all__ = ["download_channel", "download_channels", "upload_artifacts"]
