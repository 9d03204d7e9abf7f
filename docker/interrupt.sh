#!/usr/bin/env bash
# Interrupt the trainer the way a spot reclaim does, then start it on a "new instance".
#
#   docker/interrupt.sh            # ROUNDS=2 interruptions, EVERY=20 s apart, GRACE=30 s
#
# Each round: `docker compose kill -s SIGTERM trainer` (the notice, to PID 1 = spotckpt run),
# SIGKILL if it is still running after GRACE seconds (as the platform would), show what the
# supervisor reported as durable, then recreate the container (empty local dir) so that it
# resumes from MinIO. Finally wait for training to finish.
set -euo pipefail
cd "$(dirname "$0")"
ROUNDS=${ROUNDS:-2}
EVERY=${EVERY:-20}
GRACE=${GRACE:-30}
dc() { docker compose -f compose.yaml "$@"; }
running() { [ -n "$(dc ps -q --status running trainer)" ]; }

dc up -d --build
for i in $(seq 1 "$ROUNDS"); do
  sleep "$EVERY"
  echo "== interruption $i: SIGTERM to the trainer"
  dc kill -s SIGTERM trainer
  for _ in $(seq 1 "$GRACE"); do running || break; sleep 1; done
  if running; then
    echo "== grace of ${GRACE}s over: SIGKILL"
    dc kill -s SIGKILL trainer
  fi
  dc logs --tail 6 trainer
  echo "== new instance: empty local dir, resume from MinIO"
  dc up -d --no-deps --force-recreate trainer
done
docker wait "$(dc ps -aq trainer)"
dc logs --tail 12 trainer
