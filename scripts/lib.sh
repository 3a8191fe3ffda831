# Shared by the scripts: repo root, dependency check, and the micro cluster's lifetime.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Installs the Debian packages when something the project needs is missing (fresh machine).
ensure_deps() {
  local missing=0
  for f in /usr/bin/ceph-mon /usr/bin/ceph-osd /usr/bin/rbd /usr/include/rados/librados.hpp /usr/bin/g++ \
           /usr/include/rados/librados.h /usr/sbin/sshd /usr/bin/qemu-system-x86_64 /usr/bin/promtool; do
    [ -e "$f" ] || missing=1
  done
  ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || missing=1
  if [ "$missing" -eq 1 ]; then
    echo "== installing Debian packages (scripts/install-deps.sh)"
    bash "$ROOT/scripts/install-deps.sh"
  fi
}

# Starts a micro cluster in a new temp dir unless RBDFENCE_TEST_CLUSTER names a running one;
# sets RBDFENCE_TEST_CLUSTER and registers its teardown.
STARTED_CLUSTER=""
start_cluster() {
  local ip=${1:-127.0.0.1}
  if [ -n "${RBDFENCE_TEST_CLUSTER:-}" ] && bash "$ROOT/scripts/ceph-micro.sh" status "$RBDFENCE_TEST_CLUSTER" >/dev/null 2>&1; then
    echo "== using the running cluster in $RBDFENCE_TEST_CLUSTER"
    return
  fi
  RBDFENCE_TEST_CLUSTER=$(mktemp -d /tmp/rbdfence-cluster.XXXXXX)
  export RBDFENCE_TEST_CLUSTER
  STARTED_CLUSTER=$RBDFENCE_TEST_CLUSTER
  trap stop_cluster EXIT
  echo "== starting a micro Ceph cluster in $RBDFENCE_TEST_CLUSTER on $ip"
  bash "$ROOT/scripts/ceph-micro.sh" up "$RBDFENCE_TEST_CLUSTER" --ip "$ip"
}

stop_cluster() {
  if [ -n "$STARTED_CLUSTER" ]; then
    bash "$ROOT/scripts/ceph-micro.sh" down "$STARTED_CLUSTER" --purge || true
    STARTED_CLUSTER=""
  fi
}
