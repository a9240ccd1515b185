#!/usr/bin/env bash
# Make a SuperNode's authentication key pair (EC P-384, OpenSSH format), for a SuperLink started with NODE_AUTH=1.
#
#   deploy/make_node_key.sh OUT_PREFIX        e.g. deploy/keys/node0  ->  node0 (private), node0.pub (public)
#
# The private key stays on the SuperNode (NODE_KEY=deploy/keys/node0 deploy/supernode.sh ...); register the public
# key from the CLI machine before the node connects: `flwr supernode register deploy/keys/node0.pub <connection>`.
set -euo pipefail
OUT=${1:?usage: $0 OUT_PREFIX}
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT" "$OUT.pub"
ssh-keygen -q -t ecdsa -b 384 -N '' -C "fl-sim supernode" -f "$OUT"
echo "wrote $OUT (private, keep on the SuperNode) and $OUT.pub (register with flwr supernode register)"
