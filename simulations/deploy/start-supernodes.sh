#!/usr/bin/env bash
# Start N SuperNodes on this host (a demo of N devices), PIDs in $STATE/supernodes.pids.
#
#   simulations/deploy/start-supernodes.sh N SUPERLINK_ADDRESS [--ca CA_CRT]
#       [--keys KEY_DIR] [--data-dir DIR] [--first-port 9094] [--state DIR]
#
# SuperNode i gets --node-config "partition-id=i num-partitions=N" (a demo
# partition of the run's dataset) or, with --data-dir, "data-path=DIR/node-i"
# (a local dataset: a parquet file or a datasets.save_to_disk folder; the
# ClientApp fails with a clear error if it is missing or malformed).
# --ca: check the SuperLink's TLS certificate (else --insecure).
# --keys: sign in with KEY_DIR/node-i (from generate-node-keys.sh).
# Each SuperNode gets its own FLWR_HOME and port (first-port + i).
set -euo pipefail
count=${1:?usage: start-supernodes.sh N SUPERLINK_ADDRESS [options]}
superlink=${2:?usage: start-supernodes.sh N SUPERLINK_ADDRESS [options]}
shift 2
ca="" keys="" data="" first_port=9094 state=./bouquet-deploy
while [ $# -gt 0 ]; do
  case $1 in
    --ca) ca=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --keys) keys=$(cd "$2" && pwd); shift 2 ;;
    --data-dir) data=$(cd "$2" && pwd); shift 2 ;;
    --first-port) first_port=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$state"
state=$(cd "$state" && pwd)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
: > "$state/supernodes.pids"
for ((i = 0; i < count; i++)); do
  dir="$state/supernode-$i"
  mkdir -p "$dir/home" "$dir/cwd"
  args=(--superlink "$superlink" --port $((first_port + i)))
  if [ -n "$ca" ]; then args+=(--root-certificates "$ca"); else args+=(--insecure); fi
  [ -n "$keys" ] && args+=(--auth-supernode-private-key "$keys/node-$i")
  if [ -n "$data" ]; then
    args+=(--node-config "data-path=\"$data/node-$i\"")
  else
    args+=(--node-config "partition-id=$i num-partitions=$count")
  fi
  (cd "$dir/cwd"
   FLWR_HOME="$dir/home" nohup flower-supernode "${args[@]}" > "$dir/supernode.log" 2>&1 &
   echo $! >> "$state/supernodes.pids")
done
echo "Started $count SuperNodes (PIDs in $state/supernodes.pids, logs in $state/supernode-*/)"
