#!/usr/bin/env bash
# Runs a benchmark (default: all) against a micro Ceph cluster started here (or the one named
# by RBDFENCE_TEST_CLUSTER). Figures go to stdout.
# Usage: scripts/bench.sh [watchers] [fence] [service] [rack]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_deps
start_cluster "${RBDFENCE_TEST_IP:-127.0.0.1}"
if [ $# -eq 0 ]; then
  cargo bench
else
  for b in "$@"; do cargo bench --bench "$b"; done
fi
