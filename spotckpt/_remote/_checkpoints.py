"""The checkpoints under the remote prefix: the ``step-N/`` layout, seen through the store.

Which steps are committed (their ``MANIFEST.json`` exists, found by listing, never by a
pointer object), the objects under ``step-*/``, a step's manifest, and un-committing
(delete, quarantine). :class:`Checkpoints` is a base of :class:`RemoteStore`
(:mod:`._store`) and uses only its object operations (listing, reads, writes, deletes with
its retries). No ML imports.
"""
from __future__ import annotations

from typing import Any, Callable

from spotckpt._commit import MANIFEST, Manifest, parse_step_dirname, step_dirname
from spotckpt._errors import RemoteError


def _manifest_step(rel: str) -> int | None:
    """N if ``rel`` is ``step-N/MANIFEST.json`` (a checkpoint's manifest), else None."""
    d, _, name = rel.partition("/")
    return parse_step_dirname(d) if name == MANIFEST else None


class Checkpoints:
    """The ``step-N/`` checkpoints of a :class:`RemoteStore`, as its methods.

    Uses the store's ``fast`` (boto3 path or None), ``fs``, ``root``, ``newest_listed``,
    ``_call`` (retries), ``_key``, ``find``, ``cat``, ``rm`` and ``put_bytes``.
    """

    fast: Any
    fs: Any
    root: str
    newest_listed: int | None
    _call: Callable[..., Any]
    _key: Callable[[str], str]
    find: Callable[..., dict[str, int]]
    cat: Callable[[str], bytes]
    rm: Callable[..., None]
    put_bytes: Callable[[str, bytes], None]

    def step_objects(self, *, listed: bool = False) -> list[str]:
        """The relative keys of every object under ``step-*/``, in one listing (through
        boto3 for ``s3://``: three s3fs listings cost the Syncer ~15 ms of CPU after every
        upload, bench/). ``listed``: those :meth:`committed`'s listing just saw, if it was
        that listing (``s3://``: the same keys; saves a restore a second one)."""
        if listed and getattr(self, "_step_keys", None) is not None:
            return list(self._step_keys)
        if self.fast is None:  # the step dirs, then what is in each (not the free-form files)
            def ls() -> list:
                self.fs.invalidate_cache()
                try:
                    return self.fs.ls(self.root, detail=False)
                except FileNotFoundError:
                    return []
            names = self._call("listing", ls)
            dirs = [n for n in (str(x).rstrip("/").rsplit("/", 1)[-1] for x in names)
                    if parse_step_dirname(n) is not None]
            return [rel for d in dirs for rel in self.find(d)]
        key = self._key("step-")
        base = key[: -len("step-")]
        keys = self._call("listing of checkpoints", lambda: self.fast.list_keys(key))
        return [k[len(base):] for k in keys if k.startswith(base) and not k.endswith("/")]

    def committed(self) -> list[int]:
        """Steps whose manifest exists on the remote, oldest first (found by listing)."""
        def fast_go() -> list[int]:  # exactly the keys step-N/MANIFEST.json, one listing
            key = self._key("step-")
            base = key[: -len("step-")]
            rels = [k[len(base):] for k in self.fast.list_keys(key) if k.startswith(base)]
            self._step_keys = [r for r in rels if not r.endswith("/")]
            steps = [_manifest_step(r) for r in rels]
            return sorted({s for s in steps if s is not None})

        def go() -> list[int]:
            self.fs.invalidate_cache()
            try:
                hits = self.fs.glob(f"{self.root}/step-*/{MANIFEST}", detail=True)
            except FileNotFoundError:
                return []
            steps = []
            for h, info in hits.items():
                if info.get("type", "file") != "file":
                    continue  # a key step-N/MANIFEST.json/x makes a dir of that name: not a commit
                parts = h.rstrip("/").split("/")
                step = parse_step_dirname(parts[-2]) if len(parts) >= 2 else None
                if step is not None:
                    steps.append(step)
            return sorted(set(steps))
        out = self._call("listing of checkpoints", go if self.fast is None else fast_go)
        self.newest_listed = max(out + [-1 if self.newest_listed is None else self.newest_listed])
        return out

    def read_manifest(self, step: int) -> Manifest:
        return Manifest.from_json(self.cat(f"{step_dirname(step)}/{MANIFEST}"), expect_step=step)

    def delete_checkpoint(self, step: int) -> None:
        """Un-commit (manifest first), then delete the payload."""
        d = step_dirname(step)
        self.rm(f"{d}/{MANIFEST}")
        self.rm(d, recursive=True)

    def quarantine(self, step: int) -> None:
        """Make a damaged remote checkpoint invisible without deleting its data."""
        d = step_dirname(step)
        try:
            data = self.cat(f"{d}/{MANIFEST}")
        except RemoteError:
            return
        self.put_bytes(f"{d}/{MANIFEST}.quarantined", data)
        self.rm(f"{d}/{MANIFEST}")
