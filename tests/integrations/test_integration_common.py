"""What every framework adapter shares (lazy imports, the missing-dependency error), and the
helpers the per-framework end-to-end tests use: run an example script against the S3 test
server, SIGTERM it at a random moment mid-training, restart it with an empty local dir."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, S3Server
from spotckpt._commit._local import LocalDir

ADAPTERS = {"lightning": "lightning", "keras": "keras", "xgboost": "xgboost"}


# -- helpers ------------------------------------------------------------------------------
def script_env(s3: S3Server, local: Path, remote: str, **extra: str) -> dict[str, str]:
    """A subprocess environment: this one without SPOTCKPT_*, the S3 server's, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTCKPT_") or k == "SPOTCKPT_TEST_S3_ENDPOINT"}
    env.pop("AWS_ENDPOINT_URL", None)
    env.pop("AWS_PROFILE", None)
    env.update(s3.env())
    env.update(PYTHONUNBUFFERED="1", SPOTCKPT_LOCAL_DIR=str(local), SPOTCKPT_REMOTE=remote,
               SPOTCKPT_GRACE_SECONDS="20", SPOTCKPT_METADATA_INTERVAL="3600", **extra)
    return env


def start(script: str | Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    path = script if os.path.isabs(str(script)) else EXAMPLES / script
    return subprocess.Popen([sys.executable, str(path), *args], env=env, cwd=str(EXAMPLES.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(script: str | Path, args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    """Run to the end; return the output, asserting exit status 0."""
    proc = start(script, args, env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def read_until_training(proc: subprocess.Popen) -> list[str]:
    """Lines up to the one saying training starts ("fresh start ..." / "resumed at ...")."""
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(("fresh start", "resumed at")):
            return lines
    raise AssertionError("process ended before training: " + "".join(lines))


def sigterm_mid_training(proc: subprocess.Popen, training_seconds: float, rng: random.Random,
                         timeout: float = 60) -> str:
    """SIGTERM ``proc`` at a random moment of its (at least ``training_seconds`` long)
    training; assert it saved, made that durable and exited 143. Returns its output."""
    head = read_until_training(proc)
    delay = rng.uniform(0.1, 0.8) * training_seconds
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    out = "".join(head) + out + f"\n[test: SIGTERM {delay:.2f} s after training started]"
    assert proc.returncode == 143, out
    assert "durable" in out, out
    return out


def remote_steps(s3: S3Server, remote: str) -> list[int]:
    """Committed steps on the S3 server (those whose MANIFEST.json exists), oldest first."""
    bucket, _, prefix = remote[len("s3://"):].partition("/")
    keys = []
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"step-(\d+)/MANIFEST\.json$", k)))


def local_steps(local: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in local.glob("step-*") if (p / "MANIFEST.json").exists())


def committed(local: Path) -> list[int]:
    """Steps committed during the run, in order, from the local events log."""
    events = LocalDir(local).meta / "events.jsonl"
    recs = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return [r["step"] for r in recs if r["event"] == "commit"]


def resumed_step(out: str, pattern: str = r"resumed at (?:step|round) (\d+)") -> int:
    m = re.search(pattern, out)
    assert m, out
    return int(m.group(1))


def check_cadence_and_retention(s3: S3Server, local: Path, remote: str, every: int, total: int,
                                keep_last: int = 2) -> None:
    """Saves happened exactly every ``every`` steps plus one at the end, and retention kept the
    newest ``keep_last``, locally and on the remote."""
    expected = list(range(every, total + 1, every))
    if not expected or expected[-1] != total:
        expected.append(total)
    assert committed(local) == expected
    # Locally, one that was still uploading when a newer one was committed is kept until the
    # next commit's retention pass (the core never deletes a checkpoint in flight).
    kept = local_steps(local)
    assert kept[-keep_last:] == expected[-keep_last:] and len(kept) <= keep_last + 1, kept
    # The Syncer uploads the newest commit and skips one superseded before its upload began,
    # so the remote holds up to keep_last of the commits, always the final one.
    on_remote = remote_steps(s3, remote)
    assert on_remote[-1] == total and len(on_remote) <= keep_last and set(on_remote) <= set(expected), on_remote


# -- what every adapter shares ------------------------------------------------------------
def guide_snippets() -> dict[str, str]:
    """Each adapter's example in its framework guide, ``docs/guides/<name>.md``: the first
    Python block that imports ``spotckpt.integrations.<name>``."""
    guides = EXAMPLES.parent / "docs" / "guides"
    snippets = {}
    for name in ADAPTERS:
        blocks = re.findall(r"```python\n(.*?)```", (guides / f"{name}.md").read_text(), re.S)
        snippets[name] = next(b for b in blocks if f"spotckpt.integrations.{name} import" in b)
    return snippets


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_readme_snippet_runs_and_resumes(name: str, tmp_path: Path) -> None:
    """The framework guide's snippet (docs/guides/<name>.md) runs as written; run again, it
    restores the finished job."""
    code = guide_snippets()[name].replace('local_dir="/tmp/', f'local_dir="{tmp_path}/')
    (tmp_path / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTCKPT_")}
    env["KERAS_BACKEND"] = "torch"
    runs = [subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60) for _ in range(2)]
    for p in runs:
        assert p.returncode == 0, p.stdout + p.stderr
    assert "spotckpt: resuming" not in runs[0].stderr and "spotckpt: resuming" in runs[1].stderr
    assert runs[0].stdout.splitlines()[-1] == runs[1].stdout.splitlines()[-1]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_missing_framework_names_the_extra(name: str) -> None:
    """Importing an adapter imports no framework; using it without one says what to install."""
    blocked = {"lightning": ["lightning", "lightning.pytorch", "pytorch_lightning"],
               "keras": ["keras"], "xgboost": ["xgboost"]}[name]
    code = (
        "import sys\n"
        f"for n in {blocked!r}: sys.modules[n] = None\n"
        f"import spotckpt, spotckpt.integrations.{name} as m\n"
        "try:\n"
        "    m.SpotCheckpoint()\n"
        "except spotckpt.MissingDependencyError as e:\n"
        "    assert isinstance(e, ImportError)\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"pip install 'spotckpt[{ADAPTERS[name]}]'" in out.stdout


def test_importing_adapters_imports_no_framework() -> None:
    code = ("import sys\n"
            "import spotckpt.integrations.lightning, spotckpt.integrations.keras, spotckpt.integrations.xgboost\n"
            "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'keras', 'xgboost') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
