#!/bin/sh
# A private Docker engine for tests (Debian's docker.io): see tests/servers/docker_engine.py and docker_cli.py.
#   tests/servers/docker.sh up             install (root, apt), start or reuse the engine, base image
#   tests/servers/docker.sh image          build docker/Dockerfile from this checkout, no network
#   tests/servers/docker.sh status         exit 0 if up
#   tests/servers/docker.sh down [--purge] stop it, unmount, check the host; --purge: caches too
# After `up`: . "${SPOTCKPT_DOCKER_DIR:-/var/tmp/spotckpt-docker}/run/env" && $DOCKER ps
# `image` makes its wheelhouse with this Python's pip: PYTHON=.venv/bin/python (3.11, as the image).
here="$(dirname "$0")"
exec "${PYTHON:-python3}" "$here/docker_cli.py" "$@"
