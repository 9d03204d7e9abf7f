"""``spotckpt spot`` with the SageMaker container contract: each instance's own ``/opt/ml``.

Process layer. A SageMaker instance starts with a fresh ``/opt/ml`` of its own. The emulator
gives each start a fresh ``<workdir>/opt-ml/`` and, where Linux allows a private mount
namespace (root, or unprivileged user namespaces: :mod:`._mountns`), runs the instance's
``spotckpt run`` in one where that dir *is* ``/opt/ml``: scripts that hard-code
``/opt/ml/checkpoints`` or ``/opt/ml/model`` work unchanged, and two jobs on one machine never
see each other's (nor the host's) ``/opt/ml``. Where it does not (``--ml-root auto`` falls
back with a warning; ``private`` refuses), or with ``--ml-root DIR``, the ``SM_*`` variables
point into the dir instead: scripts that take their paths from them work, hard-coded
``/opt/ml`` paths do not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

from spotckpt._errors import ConfigError
from spotckpt._sagemaker import Contract, contract_from_args

from ._mountns import probe

ML = "/opt/ml"


class InstanceML:
    """The contract of an emulated job, and each instance's ``/opt/ml``."""

    def __init__(self, contract: Contract, host_root: Path, private: bool, workdir: Path) -> None:
        self.contract, self.host_root, self.private = contract, host_root, private
        self.hps_file = workdir / "hyperparameters.json"
        # as SageMaker's API carries them: each value JSON-encoded, decoded again by `run`
        self.hps_file.write_text(json.dumps({k: json.dumps(v) for k, v in contract.hyperparameters.items()}))

    @classmethod
    def from_args(cls, args: argparse.Namespace, workdir: Path, job_name: str,
                  out: TextIO = sys.stderr) -> InstanceML | None:
        """None unless the contract was asked for; raises ConfigError for bad options."""
        contract = contract_from_args(args, ml_root=ML, job_name=job_name)
        if contract is None:
            return None
        if args.local_dir:
            raise ConfigError("spotckpt spot: --local-dir does not go with the SageMaker contract: each "
                              "instance's checkpoint dir is /opt/ml/checkpoints (SageMaker's "
                              "checkpoint_local_path)")
        mode = args.ml_root or "auto"
        if mode in ("auto", "private"):
            why = probe(ML)
            host = workdir / "opt-ml"
            if why is None:
                return cls(contract, host, True, workdir)
            if mode == "private":
                raise ConfigError(f"spotckpt spot: --ml-root private: {why} (run as root, allow unprivileged "
                                  "user namespaces, or use --ml-root DIR: see docs/sagemaker.md)")
            print(f"[spot] warning: no private /opt/ml for the instances ({why}); /opt/ml is {host} "
                  "instead: SM_* variables point there, but a script that hard-codes /opt/ml paths will "
                  "not find them (run as root or allow user namespaces for a private /opt/ml)",
                  file=out, flush=True)
        else:
            host = Path(mode).expanduser().absolute()
            if host.exists() and (not host.is_dir() or any(host.iterdir())):
                raise ConfigError(f"spotckpt spot: --ml-root {host} must be an empty or new dir: each start "
                                  "empties it, as a new instance has a fresh /opt/ml")
        contract.ml_root = host
        return cls(contract, host, False, workdir)

    @property
    def local_dir(self) -> Path:
        """The instance's checkpoint dir, on this machine."""
        return self.host_root / "checkpoints"

    def fresh(self) -> None:
        """A new instance: an empty ``/opt/ml``."""
        if self.host_root.exists():
            shutil.rmtree(self.host_root)
        self.local_dir.mkdir(parents=True)

    def run_args(self) -> list[str]:
        """``spotckpt run`` options: the instance's paths as it sees them, and the contract."""
        c = self.contract
        return ["--local-dir", str(c.ml_root / "checkpoints"), "--sagemaker", "--ml-root", str(c.ml_root),
                "--job-name", c.job_name, "--hyperparameters", str(self.hps_file),
                *[x for n, u in c.channels.items() for x in ("--channel", f"{n}={u}")],
                *(["--output-path", c.output_path] if c.output_path else [])]

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run in the instance's private mount namespace (as is without one)."""
        if not self.private:
            return argv
        return [sys.executable, "-m", "spotckpt._spot._mountns", str(self.host_root), ML, "--", *argv]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("SPOTCKPT_STATE_DIR", None)  # the instance's state lives in its own /opt/ml
        return env

    def describe(self) -> dict[str, Any]:
        """The DescribeTrainingJob fields of the contract."""
        c = self.contract
        return {
            "HyperParameters": {k: v if isinstance(v, str) else json.dumps(v) for k, v in c.hyperparameters.items()},
            "InputDataConfig": [{"ChannelName": n, "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": u, "S3DataDistributionType": "FullyReplicated"}}}
                for n, u in c.channels.items()],
            "OutputDataConfig": {"S3OutputPath": c.output_path},
            "ContainerMlRoot": {"Private": self.private, "HostPath": str(self.host_root)},
        }

    def downloading(self, remote: str | None) -> str:
        names = ", ".join(self.contract.channels) or "none"
        return f"Downloading input data (channels: {names}) and checkpoints from {remote}"

    def uploading(self, remote: str | None) -> str:
        where = self.contract.artifact_prefix or "nowhere (no --output-path)"
        return f"Uploading generated training model to {where}; checkpoints to {remote}"
