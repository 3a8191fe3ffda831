#!/usr/bin/env bash
# Runs every test of rbdfence: the ABI check of vendor-headers/ against the system headers, the
# unit tests, and the integration tests against a real micro Ceph cluster (started here on
# $RBDFENCE_TEST_IP, default 127.0.0.1, and stopped at the end), real librados clients, real
# qemu and real sshd. Installs the Debian packages first on a fresh machine (needs root).
# Extra arguments go to the test runner (e.g. a test name filter).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_deps
echo "== ABI check: vendor-headers/ and the shim against <rados/librados.h>, <rados/librados.hpp>"
bash scripts/check-abi.sh
cleanup_stale_worlds
start_cluster "${RBDFENCE_TEST_IP:-127.0.0.1}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
