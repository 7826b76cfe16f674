#!/usr/bin/env bash
# Start a deployment SuperLink in the background, from a neutral directory, with
# its PID in $STATE/superlink.pid and its log appended to
# $STATE/superlink/superlink.log.
#
#   simulations/deploy/start-superlink.sh [--tls CERT_DIR] [--auth]
#       [--host 127.0.0.1] [--port 9092] [--admin-from CIDR ...] [--state DIR]
#
# --tls CERT_DIR   serve HTTPS with CERT_DIR/{ca.crt,server.pem,server.key}
#                  (from generate-certs.sh); without it the SuperLink is --insecure.
# --auth           require SuperNode authentication (register keys with
#                  `flwr supernode register KEY.pub <connection>`, on this host).
# --host ADDR      where SuperNodes connect: 127.0.0.1 (default: this host
#                  only), 0.0.0.0 (every interface) or one address.
# --admin-from CIDR  also answer admin requests from CIDR (repeatable).
# --state DIR      database, FLWR_HOME, log and PID file (default: outside the
#                  app, see common.sh).
#
# Flower 1.42 serves the Fleet API (SuperNodes), the Control API (flwr run,
# flwr supernode register, ...) and the Runtime API on this one port, and the
# Control API has no authentication of its own. The SuperLink therefore runs
# through simulations/admin_guard.py: Control and Runtime requests are answered
# only from loopback (and --host itself, and --admin-from); the Fleet API
# answers everyone who reaches the port. Administer from this host, or through
# `ssh -L 9092:127.0.0.1:9092 <server>`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
tls="" auth=0 port=9092 state=$(default_state_dir) host=127.0.0.1 admin=()
while [ $# -gt 0 ]; do
  case $1 in
    --tls) tls=$(cd "$2" && pwd); shift 2 ;;
    --auth) auth=1; shift ;;
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --admin-from) admin+=(--admin-from "$2"); shift 2 ;;
    --state) state=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$state/superlink/home" "$state/superlink/cwd"
state=$(cd "$state" && pwd)
warn_if_inside_app "$state"
if [ -f "$state/superlink.pid" ] && alive "$(cat "$state/superlink.pid")"; then
  echo "A SuperLink from $state is running (PID $(cat "$state/superlink.pid")):" \
    "stop.sh --state $state first" >&2
  exit 1
fi
case $host in
  127.*|::1|localhost) ;;
  *)
    [ -n "$tls" ] || echo "warning: insecure SuperLink on $host: traffic is not" \
      "encrypted and any device that reaches port $port can join" >&2
    [ -n "$tls" ] && [ "$auth" = 0 ] && echo "warning: without --auth any device" \
      "that reaches $host:$port and trusts ca.crt can join as a SuperNode" >&2
    ;;
esac
args=(--host "$host" --port "$port" --database "$state/superlink/state.db"
      --disable-runtime-dependency-installation)
if [ -n "$tls" ]; then
  args+=(--ssl-ca-certfile "$tls/ca.crt" --ssl-certfile "$tls/server.pem"
         --ssl-keyfile "$tls/server.key")
else
  args+=(--insecure)
fi
[ "$auth" = 1 ] && args+=(--enable-supernode-auth)
# The Python that runs flower-superlink (a venv's or the system's).
bin=$(dirname "$(command -v flower-superlink)")
python=python3
for candidate in "$bin/python" "$bin/python3"; do
  [ -x "$candidate" ] && { python=$candidate; break; }
done
log="$state/superlink/superlink.log"
echo "===== $(date '+%Y-%m-%d %H:%M:%S') start-superlink.sh ${args[*]} ${admin[*]-}" >> "$log"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
# A neutral cwd: nothing there can shadow the app's packages (python -P: nor
# the guard's own folder). `cd; cmd &`, not `cd && cmd &`: $! must be the
# SuperLink's own PID.
(cd "$state/superlink/cwd"
 FLWR_HOME="$state/superlink/home" nohup "$python" -P "$here/../admin_guard.py" \
   ${admin[@]+"${admin[@]}"} "${args[@]}" >> "$log" 2>&1 &
 echo $! > "$state/superlink.pid")
echo "SuperLink PID $(cat "$state/superlink.pid") on $host:$port; log: $log"
