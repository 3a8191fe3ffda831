#!/usr/bin/env bash
# Fuzzes every parser of input from outside the service (fuzz/fuzz_targets: addresses and
# blocklist entries, the lock record, `osd blocklist ls`, the request bodies, the kill report,
# known_hosts) with cargo-fuzz (libFuzzer, AddressSanitizer), each for SECS seconds (default
# 60), starting from fuzz/seeds/TARGET plus the corpus of earlier runs (fuzz/corpus/TARGET).
# Prints each target's executions; exits 1 at the first finding (its input is then in
# fuzz/artifacts/TARGET/; replay it with `cargo fuzz run -O TARGET FILE`).
# Installs cargo-fuzz from crates.io on first use; runs on stable Rust (RUSTC_BOOTSTRAP=1 lets it
# pass the sanitizer flag).
#   scripts/fuzz.sh [SECS] [TARGET...]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

secs=${1:-60}
shift || true
[[ $secs =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [SECS] [TARGET...]" >&2; exit 2; }
ensure_deps
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2
fi
export RUSTC_BOOTSTRAP=1
echo "== building the fuzz targets"
cargo fuzz build -O
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  if ! out=$(cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 2>&1); then
    echo "$out" | tail -40
    echo "fuzz: $t: FINDING (input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  runs=$(echo "$out" | grep -o 'Done [0-9]* runs' | tail -1)
  cov=$(echo "$out" | grep -o 'cov: [0-9]*' | tail -1)
  echo "fuzz: $t: ${runs#Done } in ${secs} s, $cov, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs"
done
