"""Under ``spotckpt run``: what the supervisor does for this Checkpointer, and what it must
do itself.

User-API layer. The supervisor uploads the ``step-N/`` dirs of one process in the dir it
watches, and mirrors the rest of that dir. It tells its command which dir and remote that
are, and the generation of the job it claimed, in ``SPOTCKPT_SUPERVISOR`` (JSON, written
by :mod:`spotckpt._supervisor._supervisor`). Then, for a Checkpointer in the command:

- one process, unnamed, in the supervisor's dir: *served*. It only commits locally; the
  supervisor uploads and applies retention (the design's "the supervisor owns the Syncer").
- the ranks of a torch.distributed job in the supervisor's dir: each rank uploads its own
  part (the supervisor knows nothing of ``rank-<R>/`` parts and combined manifests), in the
  supervisor's generation: a claim of their own would be a newer generation, and the
  supervisor, which mirrors the watched dir into the same lineage, would stop as stale.
- a named lineage (``<remote>ckpt-<name>/``) or a remote other than the supervisor's: its
  own lineage; it uploads itself and claims its own generation, as without a supervisor.
- unnamed, to the supervisor's remote, but committing into another dir: refused
  (:class:`ConfigError`). Nothing would upload it (the supervisor watches its own dir),
  and uploading itself would make two writers of one lineage, with two retentions.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from spotckpt._config import SUPERVISOR_ENV, Config, supervised
from spotckpt._errors import ConfigError
from spotckpt._events import log, redact
from spotckpt._remote import Fence, RemoteStore


@dataclasses.dataclass(frozen=True)
class Supervision:
    """What the supervisor does for one Checkpointer (see the module docstring).

    Attributes:
        served: the supervisor uploads this Checkpointer's checkpoints.
        generation: ``(generation, previous, enforced)`` of the supervisor's claim, when this
            Checkpointer uploads into the supervisor's lineage itself (ranks); else None.
        ranked: the newest checkpoint, a torch.distributed one the supervisor did not pull
            (``step``, ``world_size``, ``serializer``): a served process cannot resume it.
    """

    served: bool = False
    generation: tuple[int, int, bool] | None = None
    ranked: dict[str, Any] | None = None

    def fence(self, store: RemoteStore) -> Fence | None:
        """The supervisor's generation on ``store``, or None (claim one of its own)."""
        if self.generation is None:
            return None
        g, previous, enforced = self.generation
        return Fence(store, g, enforced=enforced, previous=previous)


def _read(env: Mapping[str, str]) -> dict[str, Any]:
    try:
        doc = json.loads(env.get(SUPERVISOR_ENV) or "{}")
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    # a supervisor that said nothing more (SPOTCKPT_SUPERVISED=1 set by hand): its dir and
    # remote are the ones it would have passed
    doc.setdefault("dir", env.get("SPOTCKPT_LOCAL_DIR"))
    doc.setdefault("remote", env.get("SPOTCKPT_REMOTE") or None)
    return doc


def supervision(cfg: Config, *, ranked: bool, env: Mapping[str, str] | None = None) -> Supervision:
    """What the supervisor (if any) does for a Checkpointer with settings ``cfg``.

    Args:
        ranked: one rank of several (torch.distributed).

    Raises:
        ConfigError: unnamed, to the supervisor's remote, from another local dir.
    """
    env = os.environ if env is None else env
    if not supervised(env) or cfg.name is not None:
        return Supervision()  # a named lineage uploads itself, to <remote>ckpt-<name>/
    doc = _read(env)
    sup_remote = doc.get("remote")
    mine = os.path.realpath(cfg.local_dir)
    same_dir = doc.get("dir") is None or os.path.realpath(str(doc["dir"])) == mine
    same_remote = cfg.remote is not None and cfg.remote == sup_remote
    if not same_dir:
        if same_remote:
            raise ConfigError(
                f"spotckpt: under `spotckpt run`, this Checkpointer commits into {cfg.local_dir} but "
                f"the supervisor uploads {doc['dir']}: nothing would upload these checkpoints to "
                f"{redact(str(sup_remote))}. Leave local_dir unset (or use the supervisor's dir), or "
                f"run `spotckpt run --local-dir {cfg.local_dir}`, or give this Checkpointer a name= "
                "(a lineage of its own, which uploads itself)")
        if cfg.remote is None:
            log.warning("spotckpt: under `spotckpt run` this Checkpointer commits into %s, which the "
                        "supervisor does not watch, and has no remote: its checkpoints stay local",
                        cfg.local_dir)
        return Supervision()  # its own remote: it uploads itself, its own generation
    if not ranked:
        r = doc.get("ranked")
        return Supervision(served=True, ranked=r if isinstance(r, dict) else None)
    if not same_remote or "generation" not in doc:
        return Supervision()  # no remote of the supervisor's: a lineage of its own
    try:
        gen = (int(doc["generation"]), int(doc["previous"]), bool(doc["enforced"]))
    except (KeyError, TypeError, ValueError):
        return Supervision()
    return Supervision(generation=gen)
