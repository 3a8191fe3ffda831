#!/usr/bin/env bash
# The main job on a local default, end to end, with every piece real:
#
#   a micro Ceph cluster (127.0.0.1) · rbdfence serve (the HTTP API) · three "hosts" of cluster c1:
#   h1 (the failed host: storage address 127.0.0.2 + a real OpenSSH sshd), h2 (the HA target,
#   127.0.0.3, no sshd) and h3 (a healthy sibling, 127.0.0.4, sshd) · a real qemu whose virtio
#   disk is the RBD image rbd/demo-vm, opened from h1's address.
#
# The VM writes, then freezes until Ceph drops its watch (the empty-watcher race), and the HA
# manager asks POST /v1/pre-instantiate whether the VM may start on h2. rbdfence blocklists h1 on
# the OSDs, kills the frozen qemu through the sibling h3, and approves. Everything it started is
# stopped on exit. Installs the Debian packages first on a fresh machine. RBDFENCE_DEMO_IP picks
# another 127.x address for the cluster (when 127.0.0.1:3300 is taken).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

H1_IP=127.0.0.2 H2_IP=127.0.0.3 H3_IP=127.0.0.4
VM_UUID=0b6e3f4a-1c2d-4e5f-8a9b-0c1d2e3f4a5b
IMAGE=rbd/demo-vm

PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

say() { printf '\n== %s\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( ($(date +%s%N) - $1) / 1000000 ))"; }

# Live = /proc/PID exists and the process is not a zombie.
alive() {
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  [ "${s%% *}" != Z ]
}

# Pretty JSON on stdin (jq when installed, else python).
pretty() { if command -v jq >/dev/null; then jq .; else "$PY" -m json.tool; fi; }

# jget EXPR < json: a Python expression over `d` (the parsed JSON), printed.
jget() { "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

free_port() {
  "$PY" -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"
}

ensure_deps
say "building rbdfence"
cargo build --quiet
B="$ROOT/target/debug/rbdfence"
T0=$(date +%s%N)

unset RBDFENCE_TEST_CLUSTER
start_cluster "${RBDFENCE_DEMO_IP:-127.0.0.1}"
export CEPH_CONF=$RBDFENCE_TEST_CLUSTER/ceph.conf

# ---- cleanup: everything this script started, by pid ----------------------------------------
WORK=$(mktemp -d /tmp/rbdfence-demo.XXXXXX)
SVC_PID="" QEMU_PID="" SSHD_PIDS=() FENCED=()
cleanup() {
  local rc=$? p i e
  set +e
  trap - EXIT
  trap '' INT TERM   # finish the cleanup even when interrupted again
  if [ -n "$SVC_PID" ] && alive "$SVC_PID"; then
    kill -TERM "$SVC_PID" 2>/dev/null
    for i in $(seq 1 400); do alive "$SVC_PID" || break; sleep 0.1; done
    alive "$SVC_PID" && kill -KILL "$SVC_PID" 2>/dev/null
  fi
  [ -n "$SVC_PID" ] && wait "$SVC_PID" 2>/dev/null
  [ -z "$QEMU_PID" ] && [ -s "$WORK/qemu.pid" ] && QEMU_PID=$(cat "$WORK/qemu.pid")
  if [ -n "$QEMU_PID" ] && alive "$QEMU_PID"; then
    kill -CONT "$QEMU_PID" 2>/dev/null
    kill -KILL "$QEMU_PID" 2>/dev/null
    for i in $(seq 1 50); do alive "$QEMU_PID" || break; sleep 0.1; done
  fi
  for p in "${SSHD_PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null
    for i in $(seq 1 30); do alive "$p" || break; sleep 0.1; done
    alive "$p" && kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  local lifted=0
  for e in "${FENCED[@]}"; do
    "$B" --id admin --timeout 5 blocklist rm "$e" >/dev/null 2>&1 && lifted=$((lifted + 1))
  done
  stop_cluster >/dev/null 2>&1
  rm -rf -- "$WORK"
  printf '   stopped: rbdfence %s, qemu %s, sshds %s; lifted %s of %s blocklist entries; cluster and temp dirs removed\n' \
    "${SVC_PID:--}" "${QEMU_PID:--}" "${SSHD_PIDS[*]:--}" "$lifted" "${#FENCED[@]}"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- two hosts with a real sshd: h1 (failed) and h3 (sibling) -------------------------------
say "hosts: h1 = $H1_IP (failed; sshd), h2 = $H2_IP (HA target), h3 = $H3_IP (sibling; sshd)"
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -C rbdfence-demo -f "$WORK/id_ed25519"
: >"$WORK/known_hosts"

# start_sshd NAME IP: sshd -D in the background on a free port; sets SSHD_ADDR. Retries when
# the port was taken meanwhile (sshd exits 0 in that case, so listening is checked directly).
start_sshd() {
  local name=$1 ip=$2 d="$WORK/sshd-$1" port pid attempt i banner
  mkdir -p "$d"
  ssh-keygen -q -t ed25519 -N '' -C "$name" -f "$d/host_ed25519"
  cp "$WORK/id_ed25519.pub" "$d/authorized_keys"
  for attempt in 1 2 3 4 5; do
    port=$(free_port "$ip")
    cat >"$d/sshd_config" <<EOF
ListenAddress $ip:$port
HostKey $d/host_ed25519
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
UseDNS no
PrintMotd no
EOF
    rm -f "$d/sshd.pid"
    /usr/sbin/sshd -D -f "$d/sshd_config" -E "$d/sshd.log" </dev/null >/dev/null 2>&1 &
    pid=$!
    for i in $(seq 1 100); do
      alive "$pid" || break
      if [ "$(cat "$d/sshd.pid" 2>/dev/null)" = "$pid" ]; then
        banner=$(timeout 2 bash -c "exec 3<>/dev/tcp/$ip/$port; head -c 15 <&3; printf 'SSH-2.0-probe\r\n' >&3" 2>/dev/null || true)
        if [ "$banner" = "SSH-2.0-OpenSSH" ]; then
          SSHD_PIDS+=("$pid")
          SSHD_ADDR=$ip:$port
          echo "[$ip]:$port $(cut -d' ' -f1,2 "$d/host_ed25519.pub")" >>"$WORK/known_hosts"
          note "$name: sshd pid $pid listening on $SSHD_ADDR"
          return 0
        fi
      fi
      sleep 0.05
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  tail -5 "$d/sshd.log" >&2 || true
  die "sshd for $name on $ip did not start listening"
}
start_sshd h1 "$H1_IP"; H1_SSH=$SSHD_ADDR
start_sshd h3 "$H3_IP"; H3_SSH=$SSHD_ADDR
note "known_hosts holds both host keys; the client key is $WORK/id_ed25519"

# ---- the service --------------------------------------------------------------------------
API_PORT=$(free_port 127.0.0.1)
API=http://127.0.0.1:$API_PORT
cat >"$WORK/rbdfence.toml" <<EOF
[ceph]
conf = "$CEPH_CONF"
id = "rbdfence"                 # least privilege: mon 'profile rbd' (+ blocklist rm), osd 'profile rbd'
[api]
listen = "127.0.0.1:$API_PORT"
[fence]
blocklist_expire_secs = 600
ledger = "$WORK/ledger.jsonl"
[ssh]
user = "root"
identity = "$WORK/id_ed25519"
known_hosts = "$WORK/known_hosts"
[[hosts]]
uuid = "h1"
cluster = "c1"
storage_addrs = ["$H1_IP"]
ssh = "$H1_SSH"
[[hosts]]
uuid = "h2"
cluster = "c1"
storage_addrs = ["$H2_IP"]
ssh = "$H2_IP:1"
[[hosts]]
uuid = "h3"
cluster = "c1"
storage_addrs = ["$H3_IP"]
ssh = "$H3_SSH"
EOF
say "rbdfence serve --config $WORK/rbdfence.toml   (API on $API, log $WORK/rbdfence.log)"
"$B" serve --config "$WORK/rbdfence.toml" </dev/null >"$WORK/rbdfence.log" 2>&1 &
SVC_PID=$!
t=$(date +%s%N)
until [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$API/readyz" 2>/dev/null)" = 200 ]; do
  if ! alive "$SVC_PID"; then tail -20 "$WORK/rbdfence.log" >&2; die "rbdfence serve exited"; fi
  [ "$(elapsed "$t")" -lt 20000 ] || { tail -20 "$WORK/rbdfence.log" >&2; die "/readyz not 200 within 20 s"; }
  sleep 0.1
done
note "pid $SVC_PID, /readyz 200 after $(elapsed "$t") ms (connected to Ceph as client.rbdfence)"

# ---- the VM ---------------------------------------------------------------------------------
say "a VM on h1: qemu with virtio disk $IMAGE, its Ceph client bound to $H1_IP"
rbd create "$IMAGE" --size 64M
cc -shared -fPIC -O2 -o "$WORK/bindaddr.so" tests/fixtures/bindaddr.c -ldl
LD_PRELOAD=$WORK/bindaddr.so RBDFENCE_BIND_ADDR=$H1_IP qemu-system-x86_64 \
  -S -nodefaults -display none -m 64 -name guest=demo -uuid "$VM_UUID" \
  -drive "file=rbd:$IMAGE:conf=$CEPH_CONF:id=admin,format=raw,if=virtio,cache=none" \
  -qmp "unix:$WORK/qmp.sock,server=on,wait=off" -daemonize -pidfile "$WORK/qemu.pid" \
  </dev/null >"$WORK/qemu.log" 2>&1 || { cat "$WORK/qemu.log" >&2; die "qemu failed to start"; }
QEMU_PID=$(cat "$WORK/qemu.pid")
note "qemu pid $QEMU_PID, -uuid $VM_UUID"

# hmp COMMAND: one human-monitor command through QMP; prints its output.
hmp() {
  "$PY" - "$WORK/qmp.sock" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
def send(cmd, **args):
    f.write(json.dumps({"execute": cmd, "arguments": args} if args else {"execute": cmd}) + "\n")
    f.flush()
    while True:
        m = json.loads(f.readline())
        if "error" in m:
            sys.exit("QMP error: %s" % m["error"])
        if "return" in m:
            return m["return"]
json.loads(f.readline())  # greeting
send("qmp_capabilities")
sys.stdout.write(send("human-monitor-command", **{"command-line": sys.argv[2]}))
PY
}
hmp 'qemu-io virtio0 "write -P 0xab 0 4k"' >/dev/null   # qemu-io prints to qemu's own stdout
note "QMP human-monitor-command: qemu-io virtio0 \"write -P 0xab 0 4k\" -> ok (the write takes the exclusive lock)"

image_json() { curl -sS --max-time 15 "$API/v1/images/$IMAGE"; }
say "GET /v1/images/$IMAGE   (what Ceph says about the image)"
image_json | pretty

say "the VM freezes (SIGSTOP $QEMU_PID): a hung host, a paused guest, a partition"
kill -STOP "$QEMU_PID"
t=$(date +%s%N)
until [ "$(image_json | jget 'len(d["watchers"])')" = 0 ]; do
  [ "$(elapsed "$t")" -lt 40000 ] || die "the frozen VM's watch did not expire within 40 s"
  sleep 0.5
done
note "watchers empty after $(elapsed "$t") ms (osd_client_watch_timeout = 5 s on this cluster; 30 s by default)"
note "GET /v1/images/$IMAGE -> $(image_json)"
note "no watchers, but the lock owner is still $H1_IP: ZStack's 'no watchers = safe' check says go now,"
note "while this qemu can wake up and write - the race rbdfence closes with the lock owner + blocklist."

# ---- the fence --------------------------------------------------------------------------------
metrics() { curl -sS --max-time 5 "$API/metrics" | grep '^rbdfence_' || true; }
metrics >"$WORK/metrics.before"
REQ=$(printf '{"request_id":"demo-1","vm_uuid":"%s","failed_host":"h1","target_host":"h2","volumes":["%s"]}' "$VM_UUID" "$IMAGE")
# post_fence OUT: the request, reply body to OUT; dies unless the answer is a 200.
post_fence() {
  local code
  code=$(curl -sS --max-time 90 -o "$1" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d "$REQ" "$API/v1/pre-instantiate") || true
  [ "$code" = 200 ] || { cat "$1" >&2 2>/dev/null; die "POST /v1/pre-instantiate answered HTTP $code"; }
}
say "POST /v1/pre-instantiate  $REQ"
t=$(date +%s%N)
post_fence "$WORK/reply.json"
wall=$(elapsed "$t")
pretty <"$WORK/reply.json"
mapfile -t FENCED < <(jget '"\n".join(((d.get("evidence") or {}).get("blocklist") or {}).get("entries") or [])' <"$WORK/reply.json" | sed '/^$/d')
summary=$(jget '"decision=%s outcome=%s reason=%s executor=%s (%s)" % (d["decision"], d["outcome"], d["reason"], ((d["evidence"].get("kill") or {}).get("executor")), ((d["evidence"].get("kill") or {}).get("role")))' <"$WORK/reply.json")
say "result: $summary   [$wall ms]"
FENCE_ID=$(jget 'd["fence_id"]' <"$WORK/reply.json")

for i in $(seq 1 50); do alive "$QEMU_PID" || break; sleep 0.1; done
if alive "$QEMU_PID"; then
  note "qemu pid $QEMU_PID: STILL RUNNING"
else
  note "qemu pid $QEMU_PID: gone (killed over SSH through the sibling)"
fi
note "rbdfence blocklist ls:"
"$B" --id rbdfence blocklist ls | sed 's/^/     /'

say "metrics that moved (GET /metrics, before -> after)"
metrics >"$WORK/metrics.after"
awk '
  NR == FNR { v = $NF; $NF = ""; before[$0] = v; next }
  /_bucket\{|_created/ { next }
  { v = $NF; $NF = ""; if (!($0 in before)) printf "   %s(new) -> %s\n", $0, v;
    else if (before[$0] != v) printf "   %s%s -> %s\n", $0, before[$0], v }
' "$WORK/metrics.before" "$WORK/metrics.after"

# ---- the replay -------------------------------------------------------------------------------
say "the HA manager retries: the same request_id again"
metrics >"$WORK/metrics.before"
post_fence "$WORK/reply2.json"
metrics >"$WORK/metrics.after"
id2=$(jget 'd["fence_id"]' <"$WORK/reply2.json")
note "fence_id $id2 ($([ "$id2" = "$FENCE_ID" ] && echo "the same one: the recorded answer" || echo "DIFFERENT"))"
if diff -q <(grep '^rbdfence_fence_outcomes_total\|^rbdfence_ceph_calls_total\|^rbdfence_ssh_sessions_total' "$WORK/metrics.before") \
           <(grep '^rbdfence_fence_outcomes_total\|^rbdfence_ceph_calls_total\|^rbdfence_ssh_sessions_total' "$WORK/metrics.after") >/dev/null; then
  note "nothing done again: no new fence outcome, Ceph call or SSH session in /metrics"
else
  note "WARNING: the replay moved fence/Ceph/SSH metrics"
fi

say "done in $(( $(elapsed "$T0") / 1000 )) s after the build; cleaning up (service, sshds, blocklist entries, cluster)"
