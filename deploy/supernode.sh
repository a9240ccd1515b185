#!/usr/bin/env bash
# Start a Flower SuperNode (one client machine) that trains partition ID of NUM partitions.
#
#   deploy/supernode.sh SUPERLINK_ADDRESS PARTITION_ID NUM_PARTITIONS [RUNTIME_PORT]
#   e.g. deploy/supernode.sh 192.168.1.10:9092 0 2
#
# NUM_PARTITIONS must equal the run's num-supernodes, and every SuperNode needs its own PARTITION_ID in
# 0..NUM_PARTITIONS-1 (the ServerApp checks both). RUNTIME_PORT (default 9094) is the node's local Runtime API
# port: two SuperNodes on one machine need different ones.
#
# Environment:
#   CERTS      folder with ca.crt (the CA that signed the SuperLink's certificate; default deploy/certs)
#   FLWR_HOME  this node's Flower state folder (default ./.flwr/supernode-PARTITION_ID)
#   NODE_KEY   private key (OpenSSH EC format, deploy/make_node_key.sh) when the SuperLink has NODE_AUTH=1
#   INSECURE   1: no TLS (loopback experiments only)
#   FLOWER_SUPERNODE  1: run Flower's own flower-supernode unchanged (a fresh flwr-clientapp process per message,
#              3 s idle polls). Default: python -m fl_sim.supernode, the same SuperNode with a warm SuperExec (each
#              message's ClientApp forked from a process that has imported torch) and short polls (fl_sim/supernode.py,
#              docs/deployment.md).
#   FL_SIM_NODE_POLL_S, FL_SIM_NODE_REPLY_POLL_S  fl_sim.supernode's idle pull interval (default 0.1 s; Flower: 3)
#              and reply-wait step (default 0.02 s; Flower: 0.5)
#   FLWR_SUPEREXEC_TASK_POLL_INTERVAL  seconds between the SuperExec's task polls (Flower's default 1.0;
#              fl_sim.superexec's default 0.05)
#   PYTHON     the interpreter with fl-sim installed (default: python on PATH)
#   SECRET_SEED  this node's secret seed (an integer in [0, 2^63)), passed as node config secret-seed: every private
#              draw of the client (batches, DP noise, GradDefense's slices, FedKL's key) derives from it and it
#              never reaches the server. Unset: the client draws one from OS entropy and keeps it in its
#              Context.state. (It appears on this machine's process list as part of --node-config.)
#   STATE_DIR  folder on this machine where the client checkpoints its Context.state every round (node config
#              state-dir; STATE_DIR/run-<run id>/partition-ID/), read back by a ClientApp whose Context.state is
#              empty. Unset: none.
# The node reads its data itself: the embedded Fashion-MNIST subset, or the run config's data-dir on this machine.
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 SUPERLINK_ADDRESS PARTITION_ID NUM_PARTITIONS [RUNTIME_PORT]" >&2; exit 2; fi
SUPERLINK=$1
PID_=$2
NPARTS=$3
RUNTIME_PORT=${4:-9094}
CERTS=${CERTS:-deploy/certs}
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr/supernode-$PID_}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle OpenMP threads sleep instead of spinning on busy cores
mkdir -p "$FLWR_HOME"
node_config="partition-id=$PID_ num-partitions=$NPARTS"
if [ -n "${SECRET_SEED:-}" ]; then
  if ! [[ "$SECRET_SEED" =~ ^(0|[1-9][0-9]{0,18})$ ]] || { [ "${#SECRET_SEED}" -eq 19 ] && [[ "$SECRET_SEED" > 9223372036854775807 ]]; }; then
    echo "SECRET_SEED=$SECRET_SEED is not allowed; it must be an integer in [0, 2^63)" >&2; exit 2
  fi
  node_config+=" secret-seed=$SECRET_SEED"
fi
[ -n "${STATE_DIR:-}" ] && node_config+=" state-dir=\"$STATE_DIR\""
args=(--superlink "$SUPERLINK" --port "$RUNTIME_PORT" --node-config "$node_config")
if [ "${INSECURE:-0}" = 1 ]; then
  args+=(--insecure)
else
  args+=(--root-certificates "$CERTS/ca.crt")
fi
[ -n "${NODE_KEY:-}" ] && args+=(--auth-supernode-private-key "$NODE_KEY")
if [ "${FLOWER_SUPERNODE:-0}" = 1 ]; then
  exec flower-supernode "${args[@]}"
fi
exec "${PYTHON:-python}" -m fl_sim.supernode "${args[@]}"
