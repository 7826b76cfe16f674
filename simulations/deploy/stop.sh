#!/usr/bin/env bash
# Stop what start-superlink.sh / start-supernodes.sh started, by PID: the
# SuperNodes first, then the SuperLink, each with every process it started
# (Flower's flower-superexec, flwr-clientapp and flwr-serverapp). SIGTERM, up
# to GRACE seconds (default 10), then SIGKILL; returns once all are gone.
#
#   simulations/deploy/stop.sh [--state DIR] [--node I] [--grace SECONDS]
#
# --node I: stop SuperNode I only (start it again with start-supernodes.sh --only I).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
state=$(default_state_dir) node="" grace=10
while [ $# -gt 0 ]; do
  case $1 in
    --state) state=$2; shift 2 ;;
    --node) node=$2; shift 2 ;;
    --grace) grace=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
status=0
pids_in() { for f in "$@"; do [ -f "$f" ] && cat "$f"; done; }
if [ -n "$node" ]; then
  files=("$state/supernode-$node/supernode.pid")
else
  files=("$state"/supernode-*/supernode.pid)
fi
# shellcheck disable=SC2046
stop_tree "$grace" $(pids_in "${files[@]}") || status=1
rm -f "${files[@]}"
if [ -z "$node" ]; then
  # shellcheck disable=SC2046
  stop_tree "$grace" $(pids_in "$state/superlink.pid") || status=1
  rm -f "$state/superlink.pid"
fi
echo "Stopped."
exit $status
