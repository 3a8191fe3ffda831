#!/usr/bin/env bash
# The main job on a local default: starts a micro Ceph cluster, holds an RBD image from a
# second address (127.0.0.2, like a VM on a hypervisor), shows what rbdfence sees
# (watchers, lock owner), fences that address on the OSDs and shows the write being refused,
# lifts the fence, and stops the cluster. Installs the Debian packages first on a fresh machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_deps
echo "== building rbdfence"
cargo build --quiet
B="$ROOT/target/debug/rbdfence"
unset RBDFENCE_TEST_CLUSTER
start_cluster "${RBDFENCE_DEMO_IP:-127.0.0.1}"
export CEPH_CONF=$RBDFENCE_TEST_CLUSTER/ceph.conf

shim=$RBDFENCE_TEST_CLUSTER/bindaddr.so
cc -shared -fPIC -O2 -o "$shim" tests/fixtures/bindaddr.c -ldl
rbd create rbd/demo-vm --size 64M

echo "== a 'VM' on host 127.0.0.2 opens rbd/demo-vm read-write and writes"
coproc HOLDER { LD_PRELOAD=$shim RBDFENCE_BIND_ADDR=127.0.0.2 exec /usr/bin/python3 tests/fixtures/holder.py \
  --conf "$CEPH_CONF" --id admin --image rbd/demo-vm 2>/dev/null; }
holder_pid=$HOLDER_PID
cleanup_holder() { kill "$holder_pid" 2>/dev/null || true; wait "$holder_pid" 2>/dev/null || true; stop_cluster; }
trap cleanup_holder EXIT
ask() { echo "$1" >&"${HOLDER[1]}"; read -r reply <&"${HOLDER[0]}"; echo "$reply"; }
read -r ready <&"${HOLDER[0]}"
echo "   holder: $ready"
echo "   write -> $(ask 'write 0 ab 4096')"

echo "== rbdfence watchers rbd/demo-vm (as the least-privileged user client.rbdfence)"
"$B" --id rbdfence watchers rbd/demo-vm
"$B" --id rbdfence watchers rbd/demo-vm --json

echo "== rbdfence blocklist add 127.0.0.2 --expire 600   (fence every client of the host)"
"$B" --id rbdfence blocklist add 127.0.0.2 --expire 600
"$B" --id rbdfence blocklist ls
echo "   the VM's next write -> $(ask 'write 4096 cd 4096')   (108 = ESHUTDOWN: blocklisted)"
echo "== watchers after the fence"
"$B" --id rbdfence watchers rbd/demo-vm

echo "== rbdfence blocklist rm 127.0.0.2   (unfence)"
"$B" --id rbdfence blocklist rm 127.0.0.2
"$B" --id rbdfence blocklist ls
echo "== done"
