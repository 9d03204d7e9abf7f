"""The SageMaker training-container contract, for scripts written against it.

Process layer (no ML imports). What a SageMaker training container gives its script, as
AWS's training toolkit (``sagemaker-training``) sets it up, so that such a script runs
unchanged under ``spotckpt run`` / ``spotckpt spot``:

- ``/opt/ml`` (``ml_root``): ``input/config/{hyperparameters,inputdataconfig,resourceconfig}.json``,
  ``input/data/<channel>/`` (each channel downloaded before the command starts),
  ``model/`` (``SM_MODEL_DIR``: uploaded as ``model.tar.gz`` when the job completes),
  ``output/data/`` (``SM_OUTPUT_DATA_DIR``: ``output.tar.gz``), ``checkpoints/``;
- variables: ``SM_MODEL_DIR``, ``SM_CHANNELS``, ``SM_CHANNEL_<NAME>``, ``SM_HPS``,
  ``SM_HP_<KEY>``, ``SM_USER_ARGS``, ``SM_HOSTS``, ``SM_CURRENT_HOST``, ``SM_NUM_GPUS``,
  ``SM_NUM_CPUS``, ``SM_OUTPUT_DATA_DIR``, ``SM_TRAINING_ENV`` (all of it as JSON), ...,
  and ``TRAINING_JOB_NAME``;
- hyperparameters as arguments: ``--KEY VALUE`` appended to the command, keys sorted (a
  one-letter key is ``-K``), as the toolkit's ``mapping.to_cmd_args`` does. Values are
  decoded as the toolkit does: ``epochs=5`` is the number 5 in ``SM_HPS``, ``true`` the
  boolean, anything that is not JSON a string.

One host (``algo-1``): multi-node jobs are not emulated. The transfers are in
:mod:`._io`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from spotckpt._errors import ConfigError

DEFAULT_ML_ROOT = "/opt/ml"
BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"  # the toolkit's own override of /opt/ml outside SageMaker
HOST = "algo-1"
_CHANNEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,255}")


def parse_channels(items: Sequence[str]) -> dict[str, str]:
    """``NAME=URL`` items -> {name: url}; a local path becomes an absolute ``file://`` URL.

    Raises:
        ConfigError: a malformed item, a bad name, or a name given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise ConfigError(f"spotckpt: --channel {item!r}: use NAME=URL, e.g. training=s3://bucket/data/")
        if not _CHANNEL_RE.fullmatch(name):
            raise ConfigError(f"spotckpt: --channel {item!r}: a channel name is letters, digits, '.', '_' or '-'")
        if name in out:
            raise ConfigError(f"spotckpt: --channel {name} given twice")
        if "://" not in url:
            url = "file://" + os.path.abspath(os.path.expanduser(url)) + ("/" if url.endswith("/") else "")
        out[name] = url
    return out


def _decode(value: str) -> Any:
    """A hyperparameter string as the toolkit reads it: JSON if it parses, else the string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def parse_hyperparameters(items: Sequence[str], files: Sequence[str] = ()) -> dict[str, Any]:
    """``--hyperparameters FILE.json`` (a JSON object; later files win), then each
    ``--hyperparameter KEY=VALUE`` (wins over the files).

    Raises:
        ConfigError: an unreadable file, not an object, or a malformed item.
    """
    hps: dict[str, Any] = {}
    for path in files:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"spotckpt: --hyperparameters {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"spotckpt: --hyperparameters {path}: not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"spotckpt: --hyperparameters {path}: must hold a JSON object of KEY: VALUE")
        # SageMaker's API carries strings (the SDK JSON-encodes each value); decode them the same way
        got = {str(k): _decode(v) if isinstance(v, str) else v for k, v in doc.items()}
        for k, v in got.items():
            _check_passable(k, v, f"--hyperparameters {path}")
        hps.update(got)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _KEY_RE.fullmatch(key):
            raise ConfigError(f"spotckpt: --hyperparameter {item!r}: use KEY=VALUE, e.g. epochs=10")
        hps[key] = _decode(value)
        _check_passable(key, hps[key], f"--hyperparameter {key}")
    return hps


def _check_passable(key: str, value: Any, where: str) -> None:
    """Refuse, before anything starts, a hyperparameter that cannot reach the command: the
    key becomes a variable name ``SM_HP_<KEY>`` (no ``=``, not empty) and an argument
    ``--KEY``, the value an argument and a variable; none may hold a NUL or a character
    the system cannot encode (a lone surrogate from JSON's ``\\ud800``). A file is input
    from elsewhere: one line here, not a traceback after the pull.

    Raises:
        ConfigError: naming ``where`` and the key.
    """
    shown = repr(key)[:60]
    if not key:
        raise ConfigError(f"spotckpt: {where}: an empty key; every hyperparameter needs a name")
    if "=" in key:
        raise ConfigError(f"spotckpt: {where}: key {shown} holds '=', which no variable name "
                          "(SM_HP_<KEY>) can; rename it")
    for what, text in (("key", f"SM_HP_{key.upper()}"), ("value", _arg_value(value)), ("value", _env_value(value))):
        if "\0" in text:
            raise ConfigError(f"spotckpt: {where}: the {what} of {shown} holds a NUL character, which "
                              "no argument or variable can; remove it")
        try:
            os.fsencode(text)
        except UnicodeEncodeError:
            raise ConfigError(f"spotckpt: {where}: the {what} of {shown} is not valid text for an "
                              "argument or variable (a lone surrogate such as \\ud800); fix it") from None


def _arg_value(v: Any) -> str:
    if isinstance(v, Mapping):
        return ",".join(f"{k}={x}" for k, x in sorted(v.items()))
    return "" if v is None else str(v)


def to_cmd_args(hps: Mapping[str, Any]) -> list[str]:
    """``{"lr": 0.1, "epochs": 5}`` -> ``["--epochs", "5", "--lr", "0.1"]`` (the toolkit's order)."""
    out: list[str] = []
    for k in sorted(hps):
        out += [f"--{k}" if len(k) > 1 else f"-{k}", _arg_value(hps[k])]
    return out


def _env_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def num_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs the container would see: ``CUDA_VISIBLE_DEVICES`` if set, else NVIDIA device files
    (the toolkit counts ``nvidia-smi --list-gpus``; no CUDA import here)."""
    env = os.environ if env is None else env
    vis = env.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


@dataclasses.dataclass
class Contract:
    """The container contract for one start of a job.

    Args:
        ml_root: where ``/opt/ml`` is as the command sees it (``/opt/ml`` in a container or
            in the emulator's private mount namespace; another dir where there is none).
        channels: name -> URL, downloaded into ``<ml_root>/input/data/<name>/``.
        hyperparameters: decoded values.
        output_path: ``model.tar.gz`` goes to ``<output_path>/<job_name>/output/``.

    Example:
        >>> c = Contract(Path("/opt/ml"), {"training": "s3://b/data/"}, {"epochs": 5}, "s3://b/out/", "job-1")
        >>> c.env()["SM_CHANNEL_TRAINING"], c.user_args()
        ('/opt/ml/input/data/training', ['--epochs', '5'])
    """

    ml_root: Path
    channels: dict[str, str]
    hyperparameters: dict[str, Any]
    output_path: str | None
    job_name: str

    @property
    def model_dir(self) -> Path:
        return self.ml_root / "model"

    @property
    def output_data_dir(self) -> Path:
        return self.ml_root / "output" / "data"

    def channel_dir(self, name: str) -> Path:
        return self.ml_root / "input" / "data" / name

    @property
    def artifact_prefix(self) -> str | None:
        """Where ``model.tar.gz`` goes: SageMaker's ``<output_path>/<job name>/output/``."""
        if not self.output_path:
            return None
        return f"{self.output_path.rstrip('/')}/{self.job_name}/output/"

    def user_args(self) -> list[str]:
        return to_cmd_args(self.hyperparameters)

    def resource_config(self) -> dict[str, Any]:
        return {"current_host": HOST, "hosts": [HOST], "network_interface_name": "eth0",
                "current_instance_type": "local", "current_group_name": "homogeneousCluster",
                "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                     "instance_type": "local", "hosts": [HOST]}]}

    def input_data_config(self) -> dict[str, Any]:
        return {n: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                    "RecordWrapperType": "None"} for n in self.channels}

    def training_env(self, env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``SM_TRAINING_ENV``: the toolkit's environment as one JSON object."""
        r = str(self.ml_root)
        return {
            "additional_framework_parameters": {},
            "channel_input_dirs": {n: str(self.channel_dir(n)) for n in self.channels},
            "current_host": HOST, "current_instance_type": "local", "hosts": [HOST],
            "framework_module": None, "hyperparameters": self.hyperparameters,
            "input_config_dir": f"{r}/input/config", "input_data_config": self.input_data_config(),
            "input_dir": f"{r}/input", "is_master": True, "job_name": self.job_name,
            "log_level": 20, "master_hostname": HOST, "model_dir": str(self.model_dir),
            "network_interface_name": "eth0", "num_cpus": os.cpu_count() or 1,
            "num_gpus": num_gpus(env), "output_data_dir": str(self.output_data_dir),
            "output_dir": f"{r}/output", "output_intermediate_dir": f"{r}/output/intermediate",
            "resource_config": self.resource_config(), "user_args": self.user_args(),
        }

    def env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The variables to add to the command's environment."""
        te = self.training_env(env)
        out = {f"SM_{k.upper()}": _env_value(v) for k, v in te.items()
               if k not in ("channel_input_dirs", "additional_framework_parameters", "user_args", "hyperparameters")}
        out.update({f"SM_HP_{k.upper()}": _env_value(v) for k, v in self.hyperparameters.items()})
        out.update({f"SM_CHANNEL_{n.upper()}": str(self.channel_dir(n)) for n in self.channels})
        out.update(SM_HPS=_env_value(self.hyperparameters), SM_CHANNELS=_env_value(sorted(self.channels)),
                   SM_USER_ARGS=_env_value(self.user_args()), SM_FRAMEWORK_PARAMS="{}",
                   SM_TRAINING_ENV=_env_value(te), TRAINING_JOB_NAME=self.job_name)
        return out

    def lay_out(self) -> None:
        """Create ``/opt/ml``'s dirs and its ``input/config/*.json``, as SageMaker does
        before the container starts (the channels' data comes next)."""
        cfg = self.ml_root / "input" / "config"
        for d in (cfg, self.model_dir, self.output_data_dir, self.ml_root / "output" / "intermediate",
                  *(self.channel_dir(n) for n in self.channels)):
            d.mkdir(parents=True, exist_ok=True)
        # SageMaker writes every hyperparameter as a string (the SDK JSON-encodes them)
        hp = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.hyperparameters.items()}
        for name, doc in (("hyperparameters.json", hp), ("resourceconfig.json", self.resource_config()),
                          ("inputdataconfig.json", self.input_data_config())):
            (cfg / name).write_text(json.dumps(doc, indent=1))


def contract_from_args(args: Any, *, ml_root: str | os.PathLike[str] | None = None,
                       job_name: str | None = None) -> Contract | None:
    """The contract the ``run``/``spot`` options ask for, or None if none was (no
    ``--sagemaker``, ``--channel``, ``--hyperparameter(s)`` or ``--output-path``)."""
    channels = parse_channels(getattr(args, "channel", None) or [])
    hps = parse_hyperparameters(getattr(args, "hyperparameter", None) or [],
                                getattr(args, "hyperparameters", None) or [])
    output = getattr(args, "output_path", None)
    if not (getattr(args, "sagemaker", False) or channels or hps or output):
        return None
    root = ml_root or getattr(args, "ml_root", None) or os.environ.get(BASE_DIR_ENV) or DEFAULT_ML_ROOT
    name = job_name or getattr(args, "job_name", None) or os.environ.get("TRAINING_JOB_NAME") or "spotckpt-job"
    return Contract(Path(root).absolute(), channels, hps, output, name)


def add_run_arguments(p: Any, *, spot: bool = False) -> None:
    """The contract's options, for ``spotckpt run`` and ``spotckpt spot``."""
    g = p.add_argument_group("SageMaker training-container contract (any of these turns it on)")
    g.add_argument("--sagemaker", action="store_true", help="set up /opt/ml and the SM_* variables "
                   "even without channels, hyperparameters or an output path")
    g.add_argument("--channel", action="append", default=[], metavar="NAME=URL",
                   help="an input channel (repeatable; any fsspec URL or a local path): downloaded to "
                        "/opt/ml/input/data/NAME before each start, SM_CHANNEL_NAME points at it")
    g.add_argument("--hyperparameter", action="append", default=[], metavar="KEY=VALUE",
                   help="passed as --KEY VALUE after the command and in SM_HPS (repeatable)")
    g.add_argument("--hyperparameters", action="append", default=[], metavar="FILE.json",
                   help="a JSON object of hyperparameters (--hyperparameter wins)")
    g.add_argument("--output-path", metavar="URL", help="S3OutputPath: /opt/ml/model goes up as "
                   "<URL>/<job-name>/output/model.tar.gz when the job completes")
    if spot:
        g.add_argument("--ml-root", default="auto", metavar="auto|private|DIR",
                       help="each instance's /opt/ml: 'private' (a mount namespace: scripts that "
                            "hard-code /opt/ml work), 'auto' (private where possible, else a dir of the "
                            "workdir, with a warning), or DIR (SM_* variables point into it)")
    else:
        g.add_argument("--ml-root", metavar="DIR", help="where /opt/ml is (default: $SAGEMAKER_BASE_DIR "
                       "or /opt/ml; the local dir defaults to DIR/checkpoints)")
        g.add_argument("--job-name", metavar="NAME", help="TrainingJobName: in SM_TRAINING_ENV and the "
                       "artifact's path (default $TRAINING_JOB_NAME or spotckpt-job)")


__all__ = ["Contract", "contract_from_args", "add_run_arguments", "parse_channels",
           "parse_hyperparameters", "to_cmd_args"]
