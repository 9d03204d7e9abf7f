"""``tests/servers/docker.sh``: the private Docker engine by hand, and the suite's background preparation.

    docker.sh up [--lease PID]          install, start or reuse the engine, base image; prints the env file
    docker.sh image [--extras E]        build docker/Dockerfile from this checkout with no network
    docker.sh prepare --lease PID [--extras E]
                                        both, for a pytest session (PID holds the engine); one JSON line
    docker.sh status                    exit 0 if up
    docker.sh release PID               drop a lease (the last one stops the engine)
    docker.sh down [--purge]            stop, unmount, check the host; --purge: the caches too

See ``docker_engine.py`` (the engine) and ``docker_image.py`` (the images).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docker_engine as eng  # noqa: E402
import docker_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
USAGE = "usage: docker.sh up [--lease PID] | image [--extras E] | prepare --lease PID [--extras E] | " \
        "status | release PID | down [--purge]"


def _opt(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else default


def _prepare(lease: int, extras: str) -> dict:
    """What a test session needs, made ahead of its first Docker test: the engine (held by
    ``lease``, the pytest process), the base image, the wheelhouse and the image."""
    t0 = time.monotonic()
    try:
        up = eng.up(lease)
        img = docker_image.build(REPO, extras, lease=lease)
    except eng.DockerError as e:
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__, "seconds": time.monotonic() - t0}
    img.pop("log", None)
    return {"up": up, "image": img, "seconds": time.monotonic() - t0}


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    try:
        if cmd == "up":
            lease = _opt(argv, "--lease")
            r = eng.up(int(lease) if lease else None)
            inst = f" (packages installed in {r['install_s']:.0f} s)" if r["install_s"] is not None else ""
            how = "up" if r["started"] else "already up, reused"
            b = r["base"]
            print(f"[docker] {how} in {r['up_s']:.1f} s{inst}: {eng.socket_path()}; base image {b['tag']} "
                  f"({b['how']}, {b['seconds']:.1f} s); CLI {eng.CLI}", file=sys.stderr)
            sys.stdout.write((eng.run_dir() / "env").read_text())
        elif cmd == "image":
            r = docker_image.build(REPO, _opt(argv, "--extras", "torch"))
            print(f"[docker] image {r['tag']} ({r['how']}, {r['seconds']:.1f} s)", file=sys.stderr)
            print(r["tag"])
        elif cmd == "prepare" and _opt(argv, "--lease"):
            r = _prepare(int(_opt(argv, "--lease")), _opt(argv, "--extras", "torch"))
            print(json.dumps(r, default=str))
            return 1 if "error" in r else 0
        elif cmd == "down":
            problems = eng.down(purge="--purge" in argv)
            if problems:
                print("[docker] down, NOT clean: " + "; ".join(problems), file=sys.stderr)
                return 1
            print("[docker] down: no engine process, no mount, host network settings unchanged", file=sys.stderr)
        elif cmd == "release" and len(argv) > 1:
            problems = eng.release(int(argv[1]))
            if problems:
                print("[docker] released and stopped, NOT clean: " + "; ".join(problems), file=sys.stderr)
                return 1
        elif cmd == "status":
            ok = eng.healthy()
            print(f"[docker] {'up: ' + str(eng.socket_path()) if ok else 'down'} ({eng.root()})")
            return 0 if ok else 1
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except eng.DockerError as e:
        print(f"[docker] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
