#!/usr/bin/env bash
# `flwr run --stream` with a verdict. Flower's `flwr run --stream` exits 0
# whatever happened to the run (a failed ServerApp logs "Exit Code: ..." on the
# SuperLink side, nothing on yours). This streams the run's log, waits for the
# run's final status and exits 0 only for finished:completed; otherwise it
# prints the status and the command that shows the whole log, and exits 1.
#
#   simulations/deploy/run.sh APP CONNECTION [flwr run options ...]
#   e.g. simulations/deploy/run.sh . deploy --run-config "num-server-rounds=3"
set -uo pipefail
app=${1:?usage: run.sh APP CONNECTION [flwr run options ...]}
connection=${2:?usage: run.sh APP CONNECTION [flwr run options ...]}
shift 2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
flwr run "$app" "$connection" --stream "$@" 2>&1 | tee "$out"
code=${PIPESTATUS[0]}
run_id=$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$out" | head -1)
if [ -z "$run_id" ]; then
  echo "run.sh: flwr run started no run (exit code $code); see its output above" >&2
  exit 1
fi
status=unknown
for _ in $(seq 120); do  # the status can lag the end of the log stream
  status=$(flwr ls --run-id "$run_id" "$connection" --format json 2>/dev/null |
    python3 -c 'import json, sys; t = sys.stdin.read(); print(json.loads(t[t.index("{"):])["runs"][0]["status"])' 2>/dev/null) ||
    status=unknown
  case $status in finished:*) break ;; esac
  sleep 0.5
done
if [ "$status" = finished:completed ]; then
  echo "run.sh: run $run_id finished:completed"
  exit 0
fi
echo "run.sh: run $run_id ended $status. Whole log: flwr log $run_id $connection --show" >&2
exit 1
