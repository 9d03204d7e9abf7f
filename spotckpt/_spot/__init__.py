"""``spotckpt spot``: SageMaker Managed Spot Training, emulated on this machine.

Process layer, above the supervisor it starts once per "instance". :mod:`._spot` runs the
lifecycle (capacity, interruptions, restarts), :mod:`._args` its options and interruption
schedule, :mod:`._report` the job's record, :mod:`._instance` the container contract per
instance, with ``/opt/ml`` bind-mounted in a private mount namespace (:mod:`._mountns`).
"""
from __future__ import annotations

from ._args import add_arguments, interruption_schedule
from ._spot import run_spot

__all__ = ["add_arguments", "interruption_schedule", "run_spot"]
