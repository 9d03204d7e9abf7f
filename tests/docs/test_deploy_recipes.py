"""docs/deploy/ and docker/: the checks that need no cluster, no cloud and no Docker engine:
schemas, parsers, `systemd-analyze verify`, `bash -n`, and the rules the recipes state (PID 1
in exec form, the graces in the right order, one sync per prefix). The image itself runs on a
real engine in tests/docker/."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from proc_helpers import PY

DEPLOY = REPO / "docs" / "deploy"
yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

# -- Kubernetes ---------------------------------------------------------------------------
# The Kubernetes types of every field k8s-job.yaml uses (batch/v1 Job, core/v1 PodSpec),
# closed with additionalProperties: false so that a misspelt or misplaced field fails, as
# `kubectl apply --validate=strict` would.
_STR = {"type": "string", "minLength": 1}
_INT = {"type": "integer", "minimum": 0}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QTY = {"type": ["string", "integer"]}


def _obj(props: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_CONTAINER = _obj({
    "name": _STR, "image": _STR,
    "command": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "args": {"type": "array", "items": {"type": "string"}},
    "env": {"type": "array", "items": _obj({"name": _STR, "value": {"type": "string"}}, ("name",))},
    "resources": _obj({"limits": {"type": "object", "additionalProperties": _QTY},
                       "requests": {"type": "object", "additionalProperties": _QTY}}),
    "volumeMounts": {"type": "array", "items": _obj({"name": _STR, "mountPath": _STR,
                                                     "readOnly": {"type": "boolean"}}, ("name", "mountPath"))},
}, ("name", "image"))
_POD_SPEC = _obj({
    "restartPolicy": {"enum": ["Never", "OnFailure"]},
    "terminationGracePeriodSeconds": _INT,
    "serviceAccountName": _STR,
    "nodeSelector": _STRMAP,
    "tolerations": {"type": "array", "items": _obj({
        "key": _STR, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}})},
    "containers": {"type": "array", "items": _CONTAINER, "minItems": 1},
    "volumes": {"type": "array", "items": _obj({
        "name": _STR, "emptyDir": _obj({"medium": {"enum": ["", "Memory"]}, "sizeLimit": _QTY})}, ("name",))},
}, ("containers", "restartPolicy"))
_RULE = _obj({
    "action": {"enum": ["Ignore", "FailJob", "Count", "FailIndex"]},
    "onPodConditions": {"type": "array", "items": _obj({"type": _STR, "status": {"type": "string"}}, ("type",))},
    "onExitCodes": _obj({"containerName": _STR, "operator": {"enum": ["In", "NotIn"]},
                         "values": {"type": "array", "items": {"type": "integer"}, "minItems": 1}},
                        ("operator", "values")),
}, ("action",))
JOB_SCHEMA = _obj({
    "apiVersion": {"const": "batch/v1"}, "kind": {"const": "Job"},
    "metadata": _obj({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                      "labels": _STRMAP}, ("name",)),
    "spec": _obj({
        "backoffLimit": _INT,
        "podFailurePolicy": _obj({"rules": {"type": "array", "items": _RULE}}, ("rules",)),
        "template": _obj({"metadata": _obj({"labels": _STRMAP}), "spec": _POD_SPEC}, ("spec",)),
    }, ("template",)),
}, ("apiVersion", "kind", "metadata", "spec"))


def _job() -> dict:
    return yaml.safe_load((DEPLOY / "k8s-job.yaml").read_text())


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_k8s_job_matches_the_schema_and_the_rules() -> None:
    job = _job()
    jsonschema.validate(job, JOB_SCHEMA)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["spotckpt", "run", "--"]          # exec form: spotckpt run is PID 1
    grace = float(_env(c)["SPOTCKPT_GRACE_SECONDS"])
    assert 0 < grace < pod["terminationGracePeriodSeconds"] < 120   # under the kubelet's, under the reclaim
    assert _env(c)["SPOTCKPT_REMOTE"].startswith("s3://")
    # podFailurePolicy needs restartPolicy Never and names a real container
    assert pod["restartPolicy"] == "Never"
    names = {x["name"] for x in pod["containers"]}
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert all(r["onExitCodes"]["containerName"] in names for r in rules if "onExitCodes" in r)
    assert any(143 in r.get("onExitCodes", {}).get("values", []) for r in rules)
    # a new pod starts with an empty /opt/ml, as a new instance does
    vols = {v["name"]: v for v in pod["volumes"]}
    ml = next(m for m in c["volumeMounts"] if m["mountPath"] == "/opt/ml")
    assert "emptyDir" in vols[ml["name"]]


@pytest.mark.parametrize("mutate, error", [
    (lambda j: j["spec"]["template"]["spec"].update(terminationGracePeriod=30), "Additional properties"),
    (lambda j: j["spec"]["template"]["spec"]["containers"][0]["env"][1].update(value=100), "is not of type 'string'"),
    (lambda j: j["spec"]["template"]["spec"].update(restartPolicy="Always"), "is not one of"),
])
def test_the_k8s_schema_catches_the_usual_mistakes(mutate, error: str) -> None:
    job = _job()
    mutate(job)
    with pytest.raises(jsonschema.ValidationError, match=error):
        jsonschema.validate(job, JOB_SCHEMA)


# -- EC2: systemd unit and user data ------------------------------------------------------
def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    cur = None
    for line in (DEPLOY / "spotckpt-train.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            cur = sections.setdefault(m.group(1), {})
            continue
        k, _, v = line.partition("=")
        assert cur is not None and _, line
        cur.setdefault(k, []).append(v)
    return sections


def test_systemd_unit_rules() -> None:
    svc = _unit()["Service"]
    env = dict(e.split("=", 1) for e in svc["Environment"])
    assert svc["KillMode"] == ["mixed"]            # SIGTERM to spotckpt run only
    assert float(svc["TimeoutStopSec"][0]) > float(env["SPOTCKPT_GRACE_SECONDS"])
    assert "143" in svc["SuccessExitStatus"][0].split()
    argv = svc["ExecStart"][0].split()
    assert argv[0].endswith("/spotckpt") and argv[1:3] == ["run", "--"]
    assert _unit()["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify`, with the unit's paths pointed at this checkout (it checks
    that ExecStart exists) and User=root (no `train` user here). It exits 0 even on unknown
    keys, so its output must be empty; a broken copy shows it is listening."""
    venv_bin = str(Path(PY).parent) + "/"
    text = (DEPLOY / "spotckpt-train.service").read_text()
    text = text.replace("/opt/train/.venv/bin/", venv_bin).replace("User=train", "User=root")
    good = tmp_path / "spotckpt-train.service"
    good.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(good)], capture_output=True, text=True, timeout=60)
    mine = [x for x in (r.stdout + r.stderr).splitlines() if good.name in x]
    assert r.returncode == 0 and not mine, r.stdout + r.stderr
    bad = tmp_path / "spotckpt-bad.service"
    bad.write_text(text.replace("KillMode=mixed", "KillMode=mixd"))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "kill mode" in (r.stdout + r.stderr).lower()


def test_user_data_is_valid_bash() -> None:
    script = DEPLOY / "ec2-user-data.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "torch==2.13.0" in text and "systemctl enable --now spotckpt-train" in text


# -- SkyPilot -----------------------------------------------------------------------------
# Top-level and `resources` fields of SkyPilot's task YAML spec (docs: reference/yaml-spec).
SKY_TOP = {"name", "workdir", "num_nodes", "resources", "envs", "secrets", "file_mounts", "setup", "run",
           "config", "volumes", "event_callback", "service"}
SKY_RESOURCES = {"infra", "cloud", "region", "zone", "accelerators", "accelerator_args", "cpus", "memory",
                 "instance_type", "use_spot", "disk_size", "disk_tier", "network_tier", "ports", "image_id",
                 "labels", "any_of", "ordered", "job_recovery", "max_hourly_cost", "autostop"}


def test_skypilot_task_parses_and_uses_spotckpt_run() -> None:
    task = yaml.safe_load((DEPLOY / "skypilot-task.yaml").read_text())
    assert set(task) <= SKY_TOP, set(task) - SKY_TOP
    res = task["resources"]
    assert set(res) <= SKY_RESOURCES, set(res) - SKY_RESOURCES
    assert res["use_spot"] is True
    assert res["job_recovery"]["strategy"] in ("FAILOVER", "EAGER_NEXT_REGION")
    assert all(isinstance(v, str) for v in task["envs"].values())
    assert task["envs"]["CKPT_URI"].startswith("s3://")
    assert re.search(r'spotckpt run --remote "\$CKPT_URI" -- python', task["run"])
    assert "torch==2.13.0" in task["setup"]
    assert float(task["envs"]["SPOTCKPT_GRACE_SECONDS"]) < 30   # under GCP's 30 s


# -- SageMaker ----------------------------------------------------------------------------
def test_sagemaker_estimator_settings() -> None:
    """The Estimator example parses; its arguments follow sagemaker.md (no SDK here)."""
    tree = ast.parse((DEPLOY / "sagemaker_estimator.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Estimator")
    kw = {k.arg: k.value for k in call.keywords}
    assert ast.literal_eval(kw["use_spot_instances"]) is True
    run_s, wait_s = (eval(compile(ast.Expression(kw[k]), "<kw>", "eval")) for k in ("max_run", "max_wait"))  # noqa: S307
    assert wait_s > run_s > 0
    env = ast.literal_eval(kw["environment"])
    assert env["SPOTCKPT_REMOTE"].startswith("s3://") and float(env["SPOTCKPT_GRACE_SECONDS"]) < 120
    # one sync per prefix: spotckpt's here, so SageMaker's is off
    assert "checkpoint_s3_uri" not in kw
    assert env["SPOTCKPT_LOCAL_DIR"] == "/opt/ml/checkpoints"


# -- Docker -------------------------------------------------------------------------------
DOCKER = REPO / "docker"


def _instruction(name: str) -> list[str]:
    m = re.search(rf"^{name}\s+(\[.*\])\s*$", (DOCKER / "Dockerfile").read_text(), re.M)
    assert m, f"Dockerfile has no exec-form {name}"
    return json.loads(m.group(1))


def test_dockerfile_uses_exec_form_entrypoint_through_spotckpt_run() -> None:
    assert _instruction("ENTRYPOINT") == ["spotckpt", "run", "--"]  # no shell: spotckpt run is PID 1
    assert _instruction("CMD")[0] == "python"


def test_compose_has_minio_bucket_and_trainer_with_endpoint() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert {"minio", "createbuckets", "trainer"} <= set(services)
    trainer = services["trainer"]
    assert trainer["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert "entrypoint" not in trainer and "command" not in trainer  # the image's: spotckpt run as PID 1
    assert trainer["environment"]["AWS_ENDPOINT_URL_S3"].startswith("http://minio:")
    assert trainer["environment"]["SPOTCKPT_REMOTE"].startswith("s3://")
    assert trainer["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"
    script = (DOCKER / "interrupt.sh").read_text()
    assert "kill -s SIGTERM" in script and os.access(DOCKER / "interrupt.sh", os.X_OK)


def test_dockerfile_torch_index_extras_and_ignore() -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"   # CPU unless asked otherwise
    torch_run = re.search(r"^RUN .*?(?<!\\)\n", text[text.index("ARG TORCH_INDEX"):], re.M | re.S).group(0)
    assert '--index-url "${TORCH_INDEX}"' in torch_run and '"torch==${TORCH_VERSION}" numpy' in torch_run
    # offline: a wheelhouse in the context replaces every index (tests/docker/ build with --network=none)
    assert args["WHEELHOUSE"] == "" and "--no-index --find-links /tmp/wheelhouse" in torch_run
    assert args["BASE_IMAGE"] == "python:3.11-slim" and "FROM ${BASE_IMAGE}" in text
    assert 'EXTRAS:+[${EXTRAS}]' in text
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert args["EXTRAS"] and set(args["EXTRAS"].split(",")) <= set(extras)
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (REPO / src).exists(), src
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv/" in ignore and ".git" in ignore


def test_stop_timeouts_match_the_grace() -> None:
    """Docker's default stop timeout is 10 s: every place that runs the image gives it the
    grace spotckpt plans for (the Dockerfile, the README and the docs pages)."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    grace = int(re.search(r"SPOTCKPT_GRACE_SECONDS=(\d+)", text).group(1))
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    timeouts = [int(x) for x in re.findall(r"--stop-timeout (\d+)", text + "".join(p.read_text() for p in pages))]
    assert re.search(r"--stop-timeout \d+", (DEPLOY / "docker.md").read_text())
    assert timeouts and set(timeouts) == {grace}
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["trainer"]
    assert compose["stop_grace_period"] == f"{grace}s"
    assert compose["environment"]["SPOTCKPT_GRACE_SECONDS"] == str(grace)
