"""Helpers shared by the chaos, fault and hostile-input suites: audits that read the remote
straight through boto3 (not through spotckpt), and the events log of a local dir."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import S3Server
from spotckpt._fence import generation_of, payload_dir
from spotckpt._local import LocalDir
from spotckpt._manifest import MANIFEST, Manifest, hasher, parse_step_dirname


def digest(algo: str, body: bytes) -> str:
    h = hasher(algo)
    h.update(body)
    return h.hexdigest()


def remote_audit(s3: S3Server, bucket: str, prefix: str) -> tuple[list[int], int]:
    """Check every remote manifest against the objects it names (size and checksum).

    Returns:
        (committed steps, number of step dirs without a manifest).
    """
    client = s3.client()
    objects: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            objects.add(o["Key"][len(prefix):])
    committed, dirs = [], set()
    for key in sorted(objects):
        d = key.split("/", 1)[0]
        step = parse_step_dirname(d)
        if step is None:
            continue
        dirs.add(step)
        if key == f"{d}/{MANIFEST}":
            m = Manifest.from_json(client.get_object(Bucket=bucket, Key=prefix + key)["Body"].read(),
                                   expect_step=step)
            for e in m.files:
                k = f"{payload_dir(step, generation_of(m))}/{e.path}"  # g-<G>/ after a restart
                assert k in objects, f"remote manifest {key} names missing {k}"
                body = client.get_object(Bucket=bucket, Key=prefix + k)["Body"].read()
                assert len(body) == e.size and digest(e.algo, body) == e.digest, \
                    f"remote manifest {key} does not match {k}"
            committed.append(step)
    return sorted(committed), len(dirs - set(committed))


def events(root: Path) -> list[dict]:
    """The events of a local dir (a line cut short by SIGKILL is skipped)."""
    p = LocalDir(root).meta / "events.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
