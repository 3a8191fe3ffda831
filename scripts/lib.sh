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

# Removes what a test run that was killed left of its namespace worlds (tests/common/world.rs):
# namespaces named rbdf<PID>x<N>-… whose test process is gone, the processes in them, and the
# micro cluster each ran.
cleanup_stale_worlds() {
  local ns pid tag
  command -v ip >/dev/null || return 0
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^rbdf[0-9]+x[0-9]+-' || true); do
    tag=${ns%%-*}
    pid=${tag#rbdf}
    pid=${pid%%x*}
    [ -d "/proc/$pid" ] && continue
    if [ -f "/tmp/rbdfence-$tag-ceph/.ceph-micro" ]; then
      bash "$ROOT/scripts/ceph-micro.sh" down "/tmp/rbdfence-$tag-ceph" --purge >/dev/null 2>&1 || true
    fi
    echo "== removing network namespace $ns left by an earlier test run (pid $pid is gone)"
    # Only processes a test started live in its namespaces (sshd, qemu): end them by pid.
    for p in $(ip netns pids "$ns" 2>/dev/null || true); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}
