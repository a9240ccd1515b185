#!/usr/bin/env bash
# Start a Flower SuperLink (the server machine) with TLS; it runs the fl-sim ServerApp when `flwr run` submits it.
#
#   deploy/superlink.sh [HOST] [PORT]        (default 127.0.0.1 9092; use 0.0.0.0 to accept other machines)
#
# Environment:
#   CERTS      folder with ca.crt, server.pem, server.key from deploy/make_certs.sh (default deploy/certs)
#   FLWR_HOME  the SuperLink's Flower state folder (default ./.flwr/superlink)
#   NODE_AUTH  1: accept only SuperNodes whose public key was registered with `flwr supernode register`
#   INSECURE   1: no TLS (loopback experiments only)
# The fl-sim run directory is written by the ServerApp on this machine (run config key out-dir, relative to the
# folder this script is started from). The process is replaced by flower-superlink (its pid is this script's).
set -euo pipefail
HOST=${1:-127.0.0.1}
PORT=${2:-9092}
CERTS=${CERTS:-deploy/certs}
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr/superlink}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle OpenMP threads sleep instead of spinning on busy cores
mkdir -p "$FLWR_HOME"
args=(--host "$HOST" --port "$PORT" --disable-runtime-dependency-installation)
if [ "${INSECURE:-0}" = 1 ]; then
  args+=(--insecure)
else
  args+=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key")
fi
[ "${NODE_AUTH:-0}" = 1 ] && args+=(--enable-supernode-auth)
exec flower-superlink "${args[@]}"
