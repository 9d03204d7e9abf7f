"""Lightning with several processes (DDP): what the Lightning adapter needs beyond one process.

Lightning reads a checkpoint callback's ``ckpt_path`` before its strategy creates the process
group, handles SIGTERM in a way that does not suit DDP, and its launcher watches the ranks it
started. These helpers deal with each; :mod:`spotckpt.integrations.lightning` uses them.
"""
from __future__ import annotations

import atexit
import importlib
import os
import sys
import time
from typing import Any


def multi_process() -> bool:
    """True when this process is one of several, even before Lightning has created the process
    group: torchrun and Lightning's own launchers set ``LOCAL_RANK`` (and ``WORLD_SIZE``) in
    every process, SLURM sets ``SLURM_NTASKS``. (Answering True for a single process costs
    nothing: the Checkpointer then opens in ``setup``.)"""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if "LOCAL_RANK" in os.environ:
        return True
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        try:
            if int(os.environ.get(name) or 1) > 1:
                return True
        except ValueError:
            pass
    return False


def hand_to_lightning(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Do what Lightning's ``resume_start`` does with a checkpoint file, from memory.

    Called from ``setup``, just before Lightning restores the model, callbacks, loops and
    optimizers from its connector's loaded checkpoint: with no ``ckpt_path`` it loads nothing
    itself and uses this one (an explicit ``ckpt_path`` would replace it, which the adapter
    refuses in ``on_fit_start``).
    """
    package = type(trainer).__module__.split(".trainer", 1)[0]  # lightning.pytorch | pytorch_lightning
    try:
        migrate = importlib.import_module(f"{package}.utilities.migration.utils")._pl_migrate_checkpoint
    except (ImportError, AttributeError):
        pass
    else:
        checkpoint = migrate(checkpoint)  # written by an older Lightning: upgraded, as from a file
    trainer._checkpoint_connector._loaded_checkpoint = checkpoint


def _ignore_signal(signum: int, frame: Any) -> None:
    """Stands in for Lightning's SIGTERM notifier."""


def bypass_sigterm_notifier(trainer: Any) -> None:
    """Keep Lightning's SIGTERM notifier out of the handler it installs when ``fit`` starts.

    In DDP that notifier acts on rank 0's signal only, and broadcasts on the default process
    group from inside the signal handler, out of step with DDP's own collectives: a SIGTERM to
    another rank hangs the job. The Checkpointer agrees on notices at step boundaries instead.
    Must run before Lightning registers its handlers (``setup`` does).
    """
    trainer._signal_connector._sigterm_notifier_fn = _ignore_signal


def restore_sigterm_notifier(trainer: Any) -> None:
    vars(trainer._signal_connector).pop("_sigterm_notifier_fn", None)


def exit_after_launcher(trainer: Any, timeout: float) -> None:
    """In a rank that Lightning's launcher started, delay the exit until the launching process
    (this node's rank 0, our parent) has exited, at most ``timeout`` seconds: its watchdog
    SIGKILLs every rank, itself included, once it sees one exit with a non-zero status, such
    as the 143 after an interruption."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.local_rank > 0 and type(env).__name__ == "LightningEnvironment":
        atexit.register(_wait_for_exit, os.getppid(), timeout)


def _wait_for_exit(parent: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < end:
        time.sleep(0.05)
