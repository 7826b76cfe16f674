#!/usr/bin/env bash
# Start N SuperNodes on this host (a demo of N devices), or (re)start one of them.
#
#   simulations/deploy/start-supernodes.sh N SUPERLINK_ADDRESS [--ca CA_CRT]
#       [--keys KEY_DIR] [--data-dir DIR] [--first-port 9094] [--only I]
#       [--state DIR]
#
# SuperNode i gets --node-config "partition-id=i num-partitions=N" (a demo
# partition of the run's dataset) or, with --data-dir, "data-path=DIR/node-i"
# (a local dataset: a parquet file or a datasets.save_to_disk folder; the
# ClientApp fails with a clear error if it is missing or malformed).
# --ca: check the SuperLink's TLS certificate (else --insecure).
# --keys: sign in with KEY_DIR/node-i (from generate-node-keys.sh).
# --only I: (re)start SuperNode I alone (same N and options as the others).
# Each SuperNode gets its own FLWR_HOME, port (first-port + i), log (appended)
# and PID file ($STATE/supernode-i/supernode.pid). A SuperNode that is still
# running is stopped first, so running this again restarts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
count=${1:?usage: start-supernodes.sh N SUPERLINK_ADDRESS [options]}
superlink=${2:?usage: start-supernodes.sh N SUPERLINK_ADDRESS [options]}
shift 2
ca="" keys="" data="" first_port=9094 state=$(default_state_dir) only=""
while [ $# -gt 0 ]; do
  case $1 in
    --ca) ca=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --keys) keys=$(cd "$2" && pwd); shift 2 ;;
    --data-dir) data=$(cd "$2" && pwd); shift 2 ;;
    --first-port) first_port=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ -n "$only" ] && ! { [ "$only" -ge 0 ] && [ "$only" -lt "$count" ]; } 2>/dev/null; then
  echo "--only $only: not a SuperNode index in 0..$((count - 1))" >&2
  exit 2
fi
mkdir -p "$state"
state=$(cd "$state" && pwd)
warn_if_inside_app "$state"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
indices=$(seq 0 $((count - 1)))
[ -n "$only" ] && indices=$only
for i in $indices; do
  dir="$state/supernode-$i"
  mkdir -p "$dir/home" "$dir/cwd"
  if [ -f "$dir/supernode.pid" ] && alive "$(cat "$dir/supernode.pid")"; then
    echo "Stopping SuperNode $i (PID $(cat "$dir/supernode.pid")) to restart it"
    stop_tree 10 "$(cat "$dir/supernode.pid")"
  fi
  args=(--superlink "$superlink" --port $((first_port + i)))
  if [ -n "$ca" ]; then args+=(--root-certificates "$ca"); else args+=(--insecure); fi
  [ -n "$keys" ] && args+=(--auth-supernode-private-key "$keys/node-$i")
  if [ -n "$data" ]; then
    args+=(--node-config "data-path=\"$data/node-$i\"")
  else
    args+=(--node-config "partition-id=$i num-partitions=$count")
  fi
  echo "===== $(date '+%Y-%m-%d %H:%M:%S') start-supernodes.sh ${args[*]}" >> "$dir/supernode.log"
  (cd "$dir/cwd"
   FLWR_HOME="$dir/home" nohup flower-supernode "${args[@]}" >> "$dir/supernode.log" 2>&1 &
   echo $! > "$dir/supernode.pid")
  echo "SuperNode $i PID $(cat "$dir/supernode.pid"); log: $dir/supernode.log"
done
