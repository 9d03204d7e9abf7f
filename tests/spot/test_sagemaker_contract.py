"""The SageMaker training-container contract: a script that knows only SM_* variables and
/opt/ml paths runs unchanged under `spotckpt spot`, through interruptions, to its model
artifact; and the pieces of the contract under `spotckpt run`.

The script is examples/sagemaker_style_contract.py (pure Python: no torch, each start takes
a fraction of a second). Data, checkpoints and the artifact go through the S3 test server.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from conftest import EXAMPLES, run_env
from proc_helpers import PY, run, spotckpt
from spotckpt._spot._mountns import probe
from spotckpt._sagemaker._env import Contract, parse_hyperparameters, to_cmd_args

SCRIPT = str(EXAMPLES / "sagemaker_style_contract.py")
DATA = "1 2 3 4 5 6 7 8 9 10\n"          # sum 55
STATUS = re.compile(r"\[spot\s+[\d.]+s\] (\S+)\s+(\S+)\s+(.*)$", re.M)
RUN = ["Starting", "Downloading", "Training"]

private_ml = pytest.mark.skipif(probe("/opt/ml") is not None,
                                reason=f"no private /opt/ml here: {probe('/opt/ml')}")


def _expected(epochs: int, scale: float) -> float:
    return scale * 55 * epochs * (epochs + 1) / 2


def _tree(path: Path) -> dict[str, float]:
    """What is in a dir (relative path -> mtime), to show it was not touched."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.lstat().st_mtime for p in path.rglob("*")}


@pytest.mark.slow
@private_ml
def test_sagemaker_script_runs_unchanged_through_two_interruptions(tmp_path: Path, s3_server, s3_remote: str) -> None:
    bucket = s3_remote.split("/")[2]
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="data/train/data.csv", Body=DATA.encode())
    host_ml = _tree(Path("/opt/ml"))
    wd = tmp_path / "wd"
    r = run(spotckpt("spot", "--workdir", str(wd), "--job-name", "sm-contract", "--grace", "5",
                     "--capacity-wait", "0.1", "--max-run", "120", "--interrupt-at", "2,5",
                     "--remote", f"s3://{bucket}/checkpoints/", "--ml-root", "private",
                     "--channel", f"training=s3://{bucket}/data/train/",
                     "--hyperparameter", "epochs=50", "--hyperparameter", "scale=2",
                     "--hyperparameter", "sleep=0.1", "--output-path", f"s3://{bucket}/output/",
                     "--", PY, SCRIPT), env=run_env(), timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    statuses = [m.group(2) for m in STATUS.finditer(r.stdout)]
    assert statuses == [*RUN, "Interrupted", *RUN, "Interrupted", *RUN, "Uploading", "Completed"], out
    rep = json.loads((wd / "describe-training-job.json").read_text())
    assert rep["TrainingJobStatus"] == "Completed" and rep["InterruptionCount"] == 2

    # the script saw the contract: SM_* variables, hyperparameters as arguments and in
    # SM_HPS, the channel's data, a /opt/ml/checkpoints of its own (it exits 3 on foreign files)
    assert "host algo-1 of ['algo-1']" in out
    assert 'hyperparameters {"epochs":50,"scale":2,"sleep":0.1}' in out
    assert "--epochs 50 --scale 2 --sleep 0.1" in out
    resumed = [int(x) for x in re.findall(r"resumed from checkpoint at epoch (\d+)", out)]
    assert resumed and max(resumed) > 0, out   # /opt/ml/checkpoints came back from the remote
    assert f"done: total {_expected(50, 2):g}" in out   # no epoch skipped, none done twice
    assert all(a["Channels"]["training"] == {"Files": 1, "Bytes": len(DATA)} for a in rep["Attempts"])

    # the model artifact, where SageMaker puts it, with what the script wrote to SM_MODEL_DIR
    url = f"s3://{bucket}/output/sm-contract/output/model.tar.gz"
    assert rep["ModelArtifacts"] == {"S3ModelArtifacts": url}
    assert f"Model artifact: {url}" in r.stdout
    body = s3.get_object(Bucket=bucket, Key="output/sm-contract/output/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.getnames() == ["model.json"]
        model = json.load(tar.extractfile("model.json"))
    assert model == {"total": _expected(50, 2), "epochs": 50}
    s3.head_object(Bucket=bucket, Key="output/sm-contract/output/output.tar.gz")  # SM_OUTPUT_DATA_DIR
    assert rep["HyperParameters"] == {"epochs": "50", "scale": "2", "sleep": "0.1"}
    assert rep["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{bucket}/data/train/"
    assert rep["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    # the host's /opt/ml (if any) was neither seen nor touched
    assert _tree(Path("/opt/ml")) == host_ml


def test_run_with_the_contract_in_a_dir(tmp_path: Path) -> None:
    """`spotckpt run --ml-root DIR` (no namespace: SM_* variables point into DIR): a local
    channel, a hyperparameters file plus an override, and the artifacts on completion."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.csv").write_text(DATA)
    (tmp_path / "hps.json").write_text(json.dumps({"epochs": "3", "scale": 1.5}))
    ml = tmp_path / "ml"
    r = run(spotckpt("run", "--remote", f"file://{tmp_path / 'remote'}/", "--ml-root", str(ml),
                     "--job-name", "j1", "--channel", f"training={tmp_path / 'data'}",
                     "--hyperparameters", str(tmp_path / "hps.json"), "--hyperparameter", "epochs=4",
                     "--output-path", f"file://{tmp_path / 'out'}/",
                     "--", PY, SCRIPT, "--checkpoint-path", str(ml / "checkpoints")),
            env=run_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"done: total {_expected(4, 1.5):g}" in r.stdout
    assert (ml / "input" / "data" / "training" / "data.csv").read_text() == DATA
    assert json.loads((ml / "input" / "config" / "hyperparameters.json").read_text()) == {"epochs": "4", "scale": "1.5"}
    with tarfile.open(tmp_path / "out" / "j1" / "output" / "model.tar.gz") as tar:
        assert json.load(tar.extractfile("model.json"))["total"] == _expected(4, 1.5)
    assert "model artifact: file://" in r.stderr


def test_interrupted_run_uploads_no_model_and_missing_channel_is_one_line(tmp_path: Path) -> None:
    # a channel with nothing behind it: one line, exit 2, nothing started (SageMaker: ClientError)
    r = run(spotckpt("run", "--ml-root", str(tmp_path / "ml"), "--channel", f"training={tmp_path / 'nothing'}/",
                     "--", PY, "-c", "print('started')"), env=run_env(), timeout=60)
    assert r.returncode == 2 and "started" not in r.stdout, r.stdout + r.stderr
    assert "channel training" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # a command that fails: no model.tar.gz (only a completed job's model goes up)
    r = run(spotckpt("run", "--ml-root", str(tmp_path / "ml2"), "--output-path", f"file://{tmp_path / 'out'}/",
                     "--", PY, "-c", "import sys; sys.exit(4)"), env=run_env(), timeout=60)
    assert r.returncode == 4
    assert not (tmp_path / "out").exists()


def test_hyperparameters_become_arguments_and_variables_as_the_toolkit_makes_them() -> None:
    hps = parse_hyperparameters(["epochs=5", "lr=0.01", "name=resnet", "b=true", "opts={\"x\": 1}"])
    assert hps == {"epochs": 5, "lr": 0.01, "name": "resnet", "b": True, "opts": {"x": 1}}
    # sorted keys, one-letter keys with one dash, dicts as k=v (sagemaker-training's to_cmd_args)
    assert to_cmd_args(hps) == ["-b", "True", "--epochs", "5", "--lr", "0.01", "--name", "resnet", "--opts", "x=1"]
    env = Contract(Path("/opt/ml"), {"training": "s3://b/d/", "test": "s3://b/t/"}, hps, None, "job").env({})
    assert env["SM_HPS"] == '{"b":true,"epochs":5,"lr":0.01,"name":"resnet","opts":{"x":1}}'
    assert env["SM_HP_EPOCHS"] == "5" and env["SM_HP_NAME"] == "resnet"
    assert json.loads(env["SM_USER_ARGS"]) == to_cmd_args(hps)
    assert env["SM_CHANNELS"] == '["test","training"]'
    assert env["SM_CHANNEL_TRAINING"] == "/opt/ml/input/data/training"
    assert env["SM_MODEL_DIR"] == "/opt/ml/model" and env["SM_OUTPUT_DATA_DIR"] == "/opt/ml/output/data"
    assert env["SM_HOSTS"] == '["algo-1"]' and env["SM_CURRENT_HOST"] == "algo-1"
    assert env["SM_NUM_GPUS"] == str(len([p for p in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", p)]))
    assert int(env["SM_NUM_CPUS"]) == os.cpu_count()
    te = json.loads(env["SM_TRAINING_ENV"])
    assert te["hyperparameters"] == hps and te["channel_input_dirs"]["test"] == "/opt/ml/input/data/test"
    assert te["job_name"] == env["TRAINING_JOB_NAME"] == "job"


@pytest.mark.parametrize("opts, needle", [
    (["--channel", "training"], "use NAME=URL"),
    (["--channel", "a=/x", "--channel", "a=/y"], "given twice"),
    (["--hyperparameter", "novalue"], "use KEY=VALUE"),
    (["--local-dir", "/tmp/x", "--sagemaker"], "does not go with the SageMaker contract"),
])
def test_bad_contract_options_are_one_line_and_exit_2(tmp_path: Path, opts: list[str], needle: str) -> None:
    r = run(spotckpt("spot", "--workdir", str(tmp_path / "wd"), "--ml-root", str(tmp_path / "ml"), *opts,
                     "--", "true"), env=run_env(), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@private_ml
@pytest.mark.parametrize("user_ns, target", [("0", "/opt/ml"), ("1", "/opt/ml"), ("1", "/opt/spotckpt-absent")])
def test_private_ml_root_hides_the_host_and_leaves_it_alone(tmp_path: Path, user_ns: str, target: str) -> None:
    """The namespace helper as root and through a user namespace: the command sees the dir
    at the target, the host's copy is untouched, and /opt's other entries stay visible; a
    target that does not exist is made inside the namespace only (a tmpfs over /opt holding
    bind mounts of its entries), never on the host."""
    (tmp_path / "inst").mkdir()
    (tmp_path / "inst" / "mine").write_text("x")
    before = _tree(Path(target))
    opt = sorted(os.listdir("/opt"))
    r = run([PY, "-m", "spotckpt._spot._mountns", str(tmp_path / "inst"), target, "--", PY, "-c",
             f"import os; print(sorted(os.listdir({target!r}))); print(sorted(os.listdir('/opt')));"
             f"open({target!r} + '/new', 'w').close(); print(os.getuid())"],
            env=run_env(SPOTCKPT_MOUNTNS_USER=user_ns), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "['mine']"
    assert set(opt) | {os.path.basename(target)} == set(eval(lines[1]))   # noqa: S307 - our own output
    assert lines[2] == str(os.getuid())
    assert (tmp_path / "inst" / "new").exists()
    assert _tree(Path(target)) == before and sorted(os.listdir("/opt")) == opt


def test_spot_job_with_a_missing_channel_fails_with_a_client_error(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    r = run(spotckpt("spot", "--workdir", str(wd), "--capacity-wait", "0", "--ml-root", str(tmp_path / "ml"),
                     "--channel", f"training={tmp_path / 'nothing'}/", "--", PY, SCRIPT), env=run_env(), timeout=90)
    assert r.returncode == 1, r.stdout + r.stderr
    assert [m.group(2) for m in STATUS.finditer(r.stdout)] == ["Starting", "Downloading", "Failed"]
    rep = json.loads((wd / "describe-training-job.json").read_text())
    assert rep["FailureReason"].startswith("ClientError: spotckpt: channel training: no objects found")
    assert "ModelArtifacts" not in rep


def test_without_a_namespace_auto_falls_back_with_a_warning_and_private_refuses(tmp_path: Path, monkeypatch) -> None:
    """Where Linux refuses a mount namespace: `auto` says so and points SM_* into the
    workdir's opt-ml/ (hard-coded /opt/ml paths will not work, and the warning says it);
    `private` is one clear error."""
    import argparse
    import io as _io

    from spotckpt._spot import _instance as _spot_sagemaker
    from spotckpt._errors import ConfigError

    monkeypatch.setattr(_spot_sagemaker, "probe", lambda target: "unshare(CLONE_NEWNS | CLONE_NEWUSER): Operation not permitted")
    args = argparse.Namespace(channel=["training=s3://b/d/"], hyperparameter=[], hyperparameters=[],
                              output_path=None, sagemaker=False, local_dir=None, ml_root="auto")
    out = _io.StringIO()
    ml = _spot_sagemaker.InstanceML.from_args(args, tmp_path, "job", out)
    assert ml is not None and not ml.private
    assert ml.contract.ml_root == tmp_path / "opt-ml"
    assert ml.contract.env({})["SM_CHANNEL_TRAINING"] == str(tmp_path / "opt-ml" / "input" / "data" / "training")
    assert ml.wrap(["x"]) == ["x"]
    assert "Operation not permitted" in out.getvalue() and "hard-codes /opt/ml" in out.getvalue()
    args.ml_root = "private"
    with pytest.raises(ConfigError, match="--ml-root private: unshare.*Operation not permitted"):
        _spot_sagemaker.InstanceML.from_args(args, tmp_path, "job", out)


@private_ml
def test_probe_names_why_there_is_no_private_dir() -> None:
    why = probe("/nonexistent-spotckpt/ml")
    assert why is not None and "/nonexistent-spotckpt does not exist" in why, why
