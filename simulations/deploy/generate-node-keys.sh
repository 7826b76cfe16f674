#!/usr/bin/env bash
# Generate one authentication key pair per SuperNode (ECDSA P-384, OpenSSH format).
#
#   simulations/deploy/generate-node-keys.sh DIR N
#
# DIR/node-<i> is SuperNode i's private key (it stays on that device:
# flower-supernode --auth-supernode-private-key DIR/node-<i>); DIR/node-<i>.pub
# is registered on the SuperLink with `flwr supernode register DIR/node-<i>.pub`.
set -euo pipefail
dir=${1:?usage: generate-node-keys.sh DIR N}
count=${2:?usage: generate-node-keys.sh DIR N}
mkdir -p "$dir"
for ((i = 0; i < count; i++)); do
  rm -f "$dir/node-$i" "$dir/node-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "bouquet-node-$i" -f "$dir/node-$i"
done
echo "Wrote $count key pairs to $dir (node-<i>, node-<i>.pub)"
