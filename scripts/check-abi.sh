#!/usr/bin/env bash
# Checks vendor-headers/rbdfence_ceph.h against the installed Ceph headers: compiles a C file
# that includes <rados/librados.h> and ours, so any prototype, struct layout or version
# constant that disagrees is a compile error; then links it with -lrados so every declared
# librados symbol must exist in the library too. Compiles and links our C++ shim
# (native/read_header.cc) against <rados/librados.hpp>: its layout assertions against
# obj_watch_t, and its prototype against our declaration.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cc -std=c11 -Wall -Wextra -Werror -pedantic -I "$root/vendor-headers" \
  "$root/vendor-headers/abi_check.c" -o "$out/abi_check" -lrados
"$out/abi_check"
c++ -std=c++17 -Wall -Wextra -Werror -shared -fPIC -I "$root/vendor-headers" \
  "$root/native/read_header.cc" -o "$out/shim.so" -Wl,--no-undefined -lrados
# Every function we declare must be exported by the libraries we link.
missing=0
exported=$(nm -D --defined-only "$(ldconfig -p | awk '/librados.so.2 /{print $NF; exit}')" |
  awk '{print $3}')
# (the function's name is the identifier right before its '('; a return type may be a handle)
for sym in $(grep -oE '^[a-z_0-9 ]+\**[a-z_0-9]+\(' "$root/vendor-headers/rbdfence_ceph.h" | grep -oE '[a-z_0-9]+\($' | tr -d '(' | grep -E '^rados_'); do
  if ! grep -qx "$sym" <<<"$exported"; then
    echo "check-abi: $sym is declared but not exported by librados" >&2
    missing=1
  fi
done
[ "$missing" -eq 0 ]
echo "check-abi: vendor-headers/rbdfence_ceph.h and native/read_header.cc agree with the system headers and librados"
