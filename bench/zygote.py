"""A warm parent per contender that forks one child per case.

``python bench/zygote.py MODULE NAME`` imports the case module (``peer_cases``) and what a
case of contender NAME imports before its clock starts (``MODULE.prepare(NAME)``), then
reads one request per line on stdin, ``{"action", "params", "env", "log"}``: it forks, the
child runs ``MODULE.CASES[action](params)`` in environment ``env`` (the case's S3 server),
with its stdout and stderr in ``log``, and prints
``RESULT <json>`` there, as a fresh ``python bench/peer_cases.py`` would; the parent answers
``{"rc": N}`` on stdout when the child has exited.

``make bench`` runs the peers' cases so. Every clock in ``peer_cases`` starts after these
imports, and nothing a clock covers (clients, a library's lazy imports, listings) has run in
the parent. What it saves is the imports: about 5 s per case (12 s with Lightning), most of
``QUICK=1``'s time when every case was a fresh process.

A forked child shares the parent's pages copy-on-write: its first garbage collection
touches every object and copies them. The child collects once before any clock (without
that, fork / fresh was 1.10 on spotckpt's restore and 1.23 on Lightning's). Checked against
fresh processes (``peer_cases.py`` run directly), restores alternated, 4 rounds on moto at
64 MiB, fork / fresh medians: spotckpt 1.07, SageMaker pattern 1.03, DCP local 0.96, DCP
fsspec 0.99, Lightning local 1.02, Lightning ``s3://`` 0.90, s3fs 1.00; every one inside the
spread of its own samples.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _child(mod: object, req: dict) -> int:
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the requests pipe is the parent's
    os.close(null)
    os.environ.clear()
    os.environ.update(req["env"])  # the server of this case (one parent serves both columns)
    gc.collect()  # copies the parent's pages the child's collections would copy, before any clock
    try:
        out = mod.CASES[req["action"]](req["params"])  # type: ignore[attr-defined]
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    except BaseException:  # noqa: BLE001 - reported in the log, as a fresh process would
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve(module: str, name: str) -> None:
    mod = importlib.import_module(module)
    mod.prepare(name)  # type: ignore[attr-defined]
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(mod, req))
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
    """The bench's side: one warm parent, started on first use, asked for one case at a time."""

    def __init__(self, module: str, name: str, env: dict[str, str], preexec: object, logdir: Path) -> None:
        import subprocess

        self.logdir, self.n = logdir, 0
        self.proc = subprocess.Popen([sys.executable, __file__, module, name], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, preexec_fn=preexec)  # type: ignore[arg-type]
        first = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not first:
            raise RuntimeError(f"bench zygote {module} {name} died while importing (rc {self.proc.wait()})")
        self.tag = f"{module}-{name}-{json.loads(first)['ready']}"

    def run(self, action: str, params: dict, env: dict[str, str]) -> tuple[int, str]:
        """(exit code, the child's stdout and stderr)."""
        self.n += 1
        log = self.logdir / f"zygote-{self.tag}-{self.n}.log"
        req = {"action": action, "params": params, "env": env, "log": str(log)}
        self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        answer = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not answer:
            raise RuntimeError(f"bench zygote {self.tag} died (rc {self.proc.wait()})")
        text = log.read_text() if log.exists() else ""
        log.unlink(missing_ok=True)
        return json.loads(answer)["rc"], text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
