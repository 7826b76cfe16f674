#!/usr/bin/env bash
# Start a deployment SuperLink in the background (one host: Fleet, Control and
# Runtime API on one HTTPS port), from a neutral directory, PID in $STATE/superlink.pid.
#
#   simulations/deploy/start-superlink.sh [--tls CERT_DIR] [--auth] [--port 9092] [--state DIR]
#
# --tls CERT_DIR  serve HTTPS with CERT_DIR/{ca.crt,server.pem,server.key}
#                 (from generate-certs.sh); without it the SuperLink is --insecure.
# --auth          require SuperNode authentication (register keys with
#                 `flwr supernode register KEY.pub <connection>`).
# --state DIR     where the database, FLWR_HOME, log and PID file go
#                 (default ./bouquet-deploy).
set -euo pipefail
tls="" auth=0 port=9092 state=./bouquet-deploy host=0.0.0.0
while [ $# -gt 0 ]; do
  case $1 in
    --tls) tls=$(cd "$2" && pwd); shift 2 ;;
    --auth) auth=1; shift ;;
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$state/superlink/home" "$state/superlink/cwd"
state=$(cd "$state" && pwd)
args=(--host "$host" --port "$port" --database "$state/superlink/state.db"
      --disable-runtime-dependency-installation)
if [ -n "$tls" ]; then
  args+=(--ssl-ca-certfile "$tls/ca.crt" --ssl-certfile "$tls/server.pem"
         --ssl-keyfile "$tls/server.key")
else
  args+=(--insecure)
fi
[ "$auth" = 1 ] && args+=(--enable-supernode-auth)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
# A neutral cwd: nothing there can shadow the app's packages.
# (`cd; cmd &`, not `cd && cmd &`: $! must be the SuperLink's own PID.)
(cd "$state/superlink/cwd"
 FLWR_HOME="$state/superlink/home" nohup flower-superlink "${args[@]}" \
   > "$state/superlink/superlink.log" 2>&1 &
 echo $! > "$state/superlink.pid")
echo "SuperLink PID $(cat "$state/superlink.pid") on port $port; log: $state/superlink/superlink.log"
