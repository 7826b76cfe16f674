#!/usr/bin/env bash
# Stop what start-superlink.sh / start-supernodes.sh started (SuperNodes first).
#
#   simulations/deploy/stop.sh [--state DIR]
set -uo pipefail
state=./bouquet-deploy
[ "${1:-}" = "--state" ] && state=$2
stop() {  # TERM, then KILL after 10 s; Flower's superexec children follow their parent
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 100); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return
    sleep 0.1
  done
  for pid in "$@"; do kill -KILL "$pid" 2>/dev/null; done
}
[ -f "$state/supernodes.pids" ] && stop $(cat "$state/supernodes.pids") && rm -f "$state/supernodes.pids"
[ -f "$state/superlink.pid" ] && stop $(cat "$state/superlink.pid") && rm -f "$state/superlink.pid"
echo "Stopped."
