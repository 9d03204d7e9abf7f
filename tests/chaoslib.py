"""Helpers shared by the chaos, fault and hostile-input suites: audits that read the remote
straight through boto3 (not through spotckpt), and the events log of a local dir."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from conftest import S3Server
from spotckpt._remote._fence import generation_of, payload_dir
from spotckpt._commit._local import LocalDir
from spotckpt._commit._manifest import MANIFEST, Manifest, hasher, parse_step_dirname


def digest(algo: str, body: bytes) -> str:
    h = hasher(algo)
    h.update(body)
    return h.hexdigest()


def remote_audit(s3: S3Server, bucket: str, prefix: str) -> tuple[list[int], int]:
    """Check every remote manifest against the objects it names (size and checksum).

    Returns:
        (committed steps, number of payload dirs, ``step-N/`` or ``step-N/g-<G>/``, holding
        objects that no manifest names: a step dir without a manifest, or another
        generation's upload beside a committed checkpoint).
    """
    client = s3.client()
    objects: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            objects.add(o["Key"][len(prefix):])
    committed = []
    for key in sorted(objects):
        d = key.split("/", 1)[0]
        step = parse_step_dirname(d)
        if step is None:
            continue
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
    orphans = {"/".join(k.split("/")[:2 if k.split("/")[1].startswith("g-") and k.count("/") > 1 else 1])
               for k in unnamed(objects, lambda k: client.get_object(Bucket=bucket, Key=prefix + k)["Body"].read())}
    return sorted(committed), len(orphans)


def orphan_keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    """The keys under step dirs that no manifest names (for an assertion's message)."""
    client = s3.client()
    keys = {o["Key"][len(prefix):] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])}
    return unnamed(keys, lambda k: client.get_object(Bucket=bucket, Key=prefix + k)["Body"].read())


def unnamed(keys: set[str], read: Callable[[str], bytes]) -> list[str]:
    """Of the relative ``keys`` of a remote, those under a ``step-N/`` dir that are neither its
    manifest nor a file that manifest names (in its generation's payload dir): payload of an
    upload that never became a checkpoint, another generation's included."""
    out = []
    manifests: dict[str, Manifest] = {}
    for key in sorted(keys):
        d = key.split("/", 1)[0]
        step = parse_step_dirname(d)
        if step is None or "/" not in key or key == f"{d}/{MANIFEST}":
            continue
        if f"{d}/{MANIFEST}" in keys:
            if d not in manifests:
                manifests[d] = Manifest.from_json(read(f"{d}/{MANIFEST}"), expect_step=step)
            m = manifests[d]
            if key in {f"{payload_dir(step, generation_of(m))}/{e.path}" for e in m.files}:
                continue
        out.append(key)
    return out


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
