#!/usr/bin/env bash
# Installs every Debian package rbdfence needs to build and test on a fresh Debian 12 machine:
# Ceph daemons and CLIs (the micro test cluster), librados C and C++ headers, libclang (bindgen),
# openssh-server (the test "hosts"), iproute2 (network namespaces), qemu with the rbd driver
# from bookworm-backports (bookworm's own 7.2 would replace the machine's 10.x qemu-utils),
# prometheus (promtool + a scraping server for the metrics tests), and busybox (its awk, which
# cannot split on NUL, must send the remote kill script down its fallback path in the tests).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: run as root (apt-get install)" >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive

# bookworm-backports, from the mirror this machine is already configured with (never a hard-coded host).
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  uri=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  if [ -z "$uri" ]; then
    uri=$(awk '/^deb / && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  if [ -z "$uri" ]; then
    echo "install-deps.sh: cannot find the Debian mirror URI to add bookworm-backports" >&2
    exit 1
  fi
  cat > /etc/apt/sources.list.d/rbdfence-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  ceph-mon ceph-osd ceph-common python3-rados python3-rbd \
  librados-dev libradospp-dev libclang-dev clang g++ \
  openssh-server openssh-client iproute2 procps jq curl busybox \
  prometheus >/dev/null
apt-get install -y -qq --no-install-recommends -t bookworm-backports \
  qemu-system-x86 qemu-block-extra qemu-utils >/dev/null

# sshd is started by the tests themselves; make sure the packaged one is not left running.
echo "install-deps.sh: done ($(ceph --version | awk '{print $3}'), $(qemu-system-x86_64 --version | head -1))"
