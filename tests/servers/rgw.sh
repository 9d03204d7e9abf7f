#!/bin/sh
# Ceph RADOS Gateway on 127.0.0.1 for tests and benchmarks: see tests/servers/rgw.py.
#   tests/servers/rgw.sh up       start (installing the Debian packages if missing; root) or reuse
#   tests/servers/rgw.sh status   exit 0 if up
#   tests/servers/rgw.sh down     stop its own daemons, remove its run dir
# After `up`: . "${SPOTCKPT_RGW_DIR:-/tmp/spotckpt-rgw}/env"
exec python3 "$(dirname "$0")/rgw.py" "$@"
