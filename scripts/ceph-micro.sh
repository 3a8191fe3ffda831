#!/usr/bin/env bash
# ceph-micro.sh: a throw-away single-node Ceph (Pacific) cluster living entirely under one directory.
#
#   scripts/ceph-micro.sh up DIR [--ip IP]     create and start (IP defaults to $CEPH_MICRO_IP or 127.0.0.1)
#   scripts/ceph-micro.sh down DIR [--purge]   stop the daemons by their pid files; --purge removes DIR
#   scripts/ceph-micro.sh status DIR           exit 0 when every daemon of DIR is running, 1 otherwise
#
# The cluster: one mon "a" (msgr v2 on IP:3300, v1 on IP:6789), one memstore OSD "osd.0" bound to IP,
# no mgr, cephx on, pool "rbd" (application rbd, 8 PGs, size 1). Client-visible results:
#   DIR/ceph.conf   usable by any client (mon_host, keyring = DIR/keyring); clients write no logs
#   DIR/keyring     client.admin, client.rbdfence (mon 'profile rbd' + blocklist rm, osd 'profile rbd'), mon., osd.0
#   DIR/env         `source` it: exports CEPH_CONF, CEPH_MICRO_DIR, CEPH_MICRO_IP, CEPH_MICRO_KEYRING
# Daemon-only paths: DIR/mon (mon store), DIR/osd (osd data), DIR/run (pid files, admin sockets),
# DIR/log (daemon logs). DIR/.ceph-micro marks a directory as ours (holds the IP).
#
# `up` on a DIR whose cluster is already running prints "already running" and exits 0 (exit 1 if it
# runs on another IP than the one asked for, or only some of its daemons run). `up` on a DIR holding
# a stopped cluster of ours recreates it from scratch (the data is not kept).
# Several clusters can run side by side, each on its own 127.x address and in its own DIR; a test
# that builds its network in namespaces runs one inside a namespace on a 198.18.0.0/15 address.
set -euo pipefail

PROG=ceph-micro.sh
UP_TIMEOUT=${CEPH_MICRO_TIMEOUT:-30}      # seconds until the pool must be writable
STOP_TIMEOUT=${CEPH_MICRO_STOP_TIMEOUT:-10} # seconds between SIGTERM and SIGKILL
MEMSTORE_BYTES=$((1024 * 1024 * 1024))
DAEMONS=(mon.a osd.0)

die() { echo "$PROG: $*" >&2; exit 1; }

# When `up` fails after a daemon was started, stop what it started (the logs stay in DIR/log).
CLEANUP_DIR=""
on_exit() {
  local rc=$?
  if [ $rc -ne 0 ] && [ -n "$CLEANUP_DIR" ]; then
    echo "$PROG: up failed; stopping the daemons it started (logs kept in $CLEANUP_DIR/log;" \
      "'$PROG down $CLEANUP_DIR --purge' removes the rest)" >&2
    CLEANUP_DIR_=$CLEANUP_DIR
    CLEANUP_DIR=""
    stop_daemons "$CLEANUP_DIR_" || true
  fi
  exit $rc
}
trap on_exit EXIT
log() { echo "$PROG: $*" >&2; }
usage() {
  cat >&2 <<'EOF'
usage: ceph-micro.sh up DIR [--ip IP]
       ceph-micro.sh down DIR [--purge]
       ceph-micro.sh status DIR
EOF
  exit 2
}

now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }

# Absolute path of DIR (which need not exist yet).
abspath() {
  case $1 in
    /*) printf '%s\n' "${1%/}" ;;
    *) printf '%s\n' "$(pwd -P)/${1%/}" ;;
  esac
}

# A pid is alive when /proc/PID exists and its state is not Z (zombie) or X (dead).
pid_alive() {
  local pid=$1 stat state
  [ -r "/proc/$pid/stat" ] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$stat" ] || return 1
  state=${stat##*) }   # the comm field may contain spaces; the state follows the last ')'
  state=${state%% *}
  case $state in Z | X | x) return 1 ;; esac
  return 0
}

# pid of daemon NAME (mon.a, osd.0) of cluster DIR when it is alive and really is that daemon
# (its command line names our ceph.conf), else nothing; returns 1 when not running.
daemon_pid() {
  local dir=$1 name=$2 pidfile pid cmdline
  pidfile="$dir/run/$name.pid"
  [ -s "$pidfile" ] || return 1
  pid=$(tr -dc '0-9' <"$pidfile" 2>/dev/null || true)
  [ -n "$pid" ] || return 1
  pid_alive "$pid" || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
  case $cmdline in
    *"ceph-${name%%.*}"*"$dir/ceph.conf"*) echo "$pid" ;;
    *) return 1 ;;
  esac
}

# Is something already listening on IP:PORT (directly, or on a wildcard address)?
port_busy() {
  local ip=$1 port=$2
  ss -Hltn 2>/dev/null | awk -v a="$ip:$port" -v p=":$port" '
    { l = $4 }
    l == a || l == "0.0.0.0" p || l == "*" p || l == "[::]" p || l == "[::ffff:" a "]" { f = 1 }
    END { exit f ? 0 : 1 }'
}

tail_logs() {
  local dir=$1 f
  for f in "$dir"/log/*.log; do
    [ -e "$f" ] || continue
    echo "---- tail of $f" >&2
    tail -n 25 "$f" >&2 || true
  done
}

cmd_status() {
  local dir=$1 name pid rc=0 ip=""
  [ -f "$dir/.ceph-micro" ] || { echo "$dir: no ceph-micro cluster"; return 1; }
  ip=$(cat "$dir/.ceph-micro")
  for name in "${DAEMONS[@]}"; do
    if pid=$(daemon_pid "$dir" "$name"); then
      echo "$name running pid $pid"
    else
      echo "$name stopped"
      rc=1
    fi
  done
  if [ $rc -eq 0 ]; then echo "$dir: running on $ip"; else echo "$dir: not running"; fi
  return $rc
}

# Waits until none of the pids is alive (zombies count as gone); SIGKILL after STOP_TIMEOUT.
wait_gone() {
  local deadline pid left=() left2=()
  deadline=$(($(now_ms) + STOP_TIMEOUT * 1000))
  while :; do
    left=()
    for pid in "$@"; do pid_alive "$pid" && left+=("$pid"); done
    [ ${#left[@]} -eq 0 ] && return 0
    [ "$(now_ms)" -ge "$deadline" ] && break
    sleep 0.02
  done
  log "SIGKILL to ${left[*]} (still there ${STOP_TIMEOUT}s after SIGTERM)"
  kill -KILL "${left[@]}" 2>/dev/null || true
  deadline=$(($(now_ms) + 5000))
  while :; do
    left2=()
    for pid in "${left[@]}"; do pid_alive "$pid" && left2+=("$pid"); done
    [ ${#left2[@]} -eq 0 ] && return 0
    [ "$(now_ms)" -ge "$deadline" ] && die "pids ${left2[*]} survive SIGKILL"
    sleep 0.05
  done
}

# Stops every daemon of DIR that is running. The OSD goes first, while the mon can still
# acknowledge its "going down" message (else it waits osd_mon_shutdown_timeout for the ack).
stop_daemons() {
  local dir=$1 name pid
  for name in osd.0 mon.a; do
    if pid=$(daemon_pid "$dir" "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone "$pid"
    fi
    rm -f "$dir/run/$name.pid"
  done
}

cmd_down() {
  local dir=$1 purge=$2 t0
  t0=$(now_ms)
  if [ ! -f "$dir/.ceph-micro" ]; then
    [ -d "$dir" ] || { log "$dir: nothing there"; return 0; }
    die "$dir is not a ceph-micro directory (no .ceph-micro); refusing to touch it"
  fi
  stop_daemons "$dir"
  if [ "$purge" = 1 ]; then
    rm -rf -- "$dir"
  fi
  log "down $dir$([ "$purge" = 1 ] && echo ' (purged)') in $(($(now_ms) - t0)) ms"
}

write_conf() {
  local dir=$1 ip=$2 fsid=$3
  cat >"$dir/ceph.conf" <<EOF
# written by ceph-micro.sh; a single-node test cluster, not for production
[global]
fsid = $fsid
mon_host = [v2:$ip:3300,v1:$ip:6789]
keyring = $dir/keyring
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
ms_bind_ipv6 = false
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
osd_client_watch_timeout = 5

[mon]
mon_data = $dir/mon/\$name
paxos_propose_interval = 0.1
mon_data_avail_warn = 1
mon_data_avail_crit = 0
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
run_dir = $dir/run
crash_dir = $dir/run/crash

[osd]
osd_data = $dir/osd/\$name
osd_objectstore = memstore
memstore_device_bytes = $MEMSTORE_BYTES
public_addr = $ip
cluster_addr = $ip
osd_crush_update_on_start = true
osd_mon_shutdown_timeout = 1
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
run_dir = $dir/run
crash_dir = $dir/run/crash
EOF
}

# The cluster's address: a 127.x.y.z address, or — inside a network namespace a test made, never
# in the machine's own — an address of 198.18.0.0/15 that an interface of that namespace holds.
check_ip() {
  local ip=$1
  [[ $ip =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] && return 0
  [[ $ip =~ ^198\.1[89]\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
    || die "--ip must be a 127.x.y.z address (or 198.18.0.0/15 inside a test's network namespace), got '$ip'"
  [ "$(readlink /proc/self/ns/net)" != "$(readlink /proc/1/ns/net)" ] \
    || die "--ip $ip: 198.18.0.0/15 is only for a test's own network namespace, not the machine's"
  ip -o -4 addr show | awk '{print $4}' | grep -qx "$ip/[0-9]*" \
    || die "--ip $ip: no interface of this network namespace holds it"
}

cmd_up() {
  local dir=$1 ip=$2 t0 name fsid osd_uuid conf kr
  t0=$(now_ms)
  check_ip "$ip"
  for bin in ceph ceph-mon ceph-osd ceph-authtool monmaptool rados ss; do
    command -v "$bin" >/dev/null || die "$bin not found (run scripts/install-deps.sh)"
  done

  if [ -f "$dir/.ceph-micro" ]; then
    local old_ip alive=() dead=()
    old_ip=$(cat "$dir/.ceph-micro")
    for name in "${DAEMONS[@]}"; do
      if daemon_pid "$dir" "$name" >/dev/null; then alive+=("$name"); else dead+=("$name"); fi
    done
    if [ ${#dead[@]} -eq 0 ]; then
      [ "$old_ip" = "$ip" ] || die "$dir: a cluster is already running there on $old_ip, not $ip"
      echo "$PROG: $dir: already running on $ip"
      return 0
    fi
    [ ${#alive[@]} -eq 0 ] || die "$dir: only ${alive[*]} running (${dead[*]} stopped); run '$PROG down $dir' first"
    log "$dir: stale stopped cluster, recreating it"
    rm -rf -- "$dir/mon" "$dir/osd" "$dir/run" "$dir/log" "$dir/ceph.conf" "$dir/keyring" \
      "$dir/env" "$dir/monmap" "$dir/.ceph-micro"
  elif [ -e "$dir/ceph.conf" ] || [ -e "$dir/mon" ] || [ -e "$dir/osd" ]; then
    die "$dir holds a ceph.conf/mon/osd that ceph-micro did not create; refusing to overwrite"
  fi

  port_busy "$ip" 3300 && die "$ip:3300 is already in use (another cluster on $ip?); pick another --ip"
  port_busy "$ip" 6789 && die "$ip:6789 is already in use (another cluster on $ip?); pick another --ip"

  mkdir -p "$dir/mon" "$dir/osd/osd.0" "$dir/run" "$dir/log"
  echo "$ip" >"$dir/.ceph-micro"
  conf="$dir/ceph.conf"
  kr="$dir/keyring"
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$dir" "$ip" "$fsid"

  # Keys and caps (all entities in one keyring: a throw-away cluster).
  ceph-authtool "$kr" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$kr" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$kr" --gen-key -n client.rbdfence \
    --cap mon 'profile rbd, allow command "osd blocklist" with blocklistop=rm' \
    --cap osd 'profile rbd' >/dev/null
  ceph-authtool "$kr" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
  chmod 600 "$kr"

  cat >"$dir/env" <<EOF
export CEPH_CONF=$conf
export CEPH_MICRO_DIR=$dir
export CEPH_MICRO_IP=$ip
export CEPH_MICRO_KEYRING=$kr
EOF

  monmaptool --create --enable-all-features --fsid "$fsid" --addv a "[v2:$ip:3300,v1:$ip:6789]" "$dir/monmap" >/dev/null \
    || die "monmaptool failed"
  ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" --keyring "$kr" >"$dir/log/mkfs-mon.out" 2>&1 \
    || { cat "$dir/log/mkfs-mon.out" >&2; die "ceph-mon --mkfs failed"; }
  CLEANUP_DIR=$dir
  ceph-mon -c "$conf" -i a >"$dir/log/start-mon.out" 2>&1 \
    || { cat "$dir/log/start-mon.out" >&2; tail_logs "$dir"; die "ceph-mon failed to start"; }

  # The OSD's mkfs needs no mon (fsid from ceph.conf, uuid from us).
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" \
    >"$dir/log/mkfs-osd.out" 2>&1 || { cat "$dir/log/mkfs-osd.out" >&2; die "ceph-osd --mkfs failed"; }

  # Mon commands through the ceph CLI, bounded; the pool commands share one process (read from stdin).
  local cli=(ceph -c "$conf" -n client.admin --connect-timeout 10
    --rados-mon-op-timeout 10 --rados-osd-op-timeout 10)
  if ! timeout 20 "${cli[@]}" osd new "$osd_uuid" 0 >"$dir/log/setup-1.out" 2>&1 </dev/null; then
    cat "$dir/log/setup-1.out" >&2; tail_logs "$dir"; die "'ceph osd new' failed"
  fi
  ceph-osd -c "$conf" -i 0 >"$dir/log/start-osd.out" 2>&1 \
    || { cat "$dir/log/start-osd.out" >&2; tail_logs "$dir"; die "ceph-osd failed to start"; }
  if ! timeout 20 "${cli[@]}" >"$dir/log/setup-2.out" 2>&1 <<EOF
osd pool create rbd 8 8 replicated
osd pool application enable rbd rbd
EOF
  then
    cat "$dir/log/setup-2.out" >&2; tail_logs "$dir"; die "creating pool rbd failed"
  fi

  # Writable? (osd.0 up, PGs active): poll a small bounded rados put.
  local deadline=$((t0 + UP_TIMEOUT * 1000)) probe="$dir/run/probe"
  echo probe >"$probe"
  while :; do
    if timeout 5 rados -c "$conf" -n client.admin -p rbd --rados-osd-op-timeout 2 \
      --rados-mon-op-timeout 2 put ceph-micro-probe "$probe" >/dev/null 2>"$dir/log/probe.out"; then
      break
    fi
    if [ "$(now_ms)" -ge "$deadline" ]; then
      log "pool rbd not writable after ${UP_TIMEOUT}s; last probe:"
      cat "$dir/log/probe.out" >&2 || true
      timeout 10 "${cli[@]}" osd stat >&2 2>&1 || true
      tail_logs "$dir"
      die "up $dir failed: pool rbd not writable within ${UP_TIMEOUT}s"
    fi
    for name in "${DAEMONS[@]}"; do
      daemon_pid "$dir" "$name" >/dev/null || { tail_logs "$dir"; die "$name died during startup"; }
    done
    sleep 0.1
  done
  rados -c "$conf" -n client.admin -p rbd --rados-osd-op-timeout 5 rm ceph-micro-probe >/dev/null 2>&1 || true
  rm -f "$probe"
  CLEANUP_DIR=""
  echo "$PROG: up $dir on $ip: writable in $(($(now_ms) - t0)) ms (source $dir/env)"
}

[ $# -ge 2 ] || usage
action=$1
case $2 in *[[:space:]]*) die "DIR must not contain whitespace (ceph.conf paths): '$2'" ;; esac
DIR=$(abspath "$2")
shift 2
case $action in
  up)
    IP=${CEPH_MICRO_IP:-127.0.0.1}
    while [ $# -gt 0 ]; do
      case $1 in
        --ip) [ $# -ge 2 ] || usage; IP=$2; shift 2 ;;
        --ip=*) IP=${1#--ip=}; shift ;;
        *) usage ;;
      esac
    done
    [ -d "$DIR" ] && DIR=$(cd "$DIR" && pwd -P)
    cmd_up "$DIR" "$IP"
    ;;
  down)
    PURGE=0
    while [ $# -gt 0 ]; do
      case $1 in
        --purge) PURGE=1; shift ;;
        *) usage ;;
      esac
    done
    [ -d "$DIR" ] && DIR=$(cd "$DIR" && pwd -P)
    cmd_down "$DIR" "$PURGE"
    ;;
  status)
    [ $# -eq 0 ] || usage
    [ -d "$DIR" ] || { echo "$DIR: no such directory"; exit 1; }
    DIR=$(cd "$DIR" && pwd -P)
    cmd_status "$DIR"
    ;;
  *) usage ;;
esac
