#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests and benchmarks.
#
#   scripts/ceph/cluster.sh start DIR [SIZE_MIB]   prints CONF=<path> KEYRING=<path> POOL=rbd
#   scripts/ceph/cluster.sh stop DIR               kills what start started (by PID)
#   scripts/ceph/cluster.sh osd-pause DIR          freezes the OSD (SIGSTOP): requests wait
#   scripts/ceph/cluster.sh osd-resume DIR         lets it run again (SIGCONT)
#   scripts/ceph/cluster.sh osd-kill DIR           SIGKILLs the OSD (bluestore only)
#   scripts/ceph/cluster.sh osd-restart DIR        starts it again on its data
#
# CEPH_STORE=bluestore puts the OSD on BlueStore over a sparse file of
# SIZE_MIB in DIR (an OSD that survives SIGKILL and comes back with its data,
# as a real one does); the default `memstore` keeps everything in memory (its
# objects die with the process: it cannot be restarted).
#
# One monitor and one OSD on 127.0.0.1 (ports picked free), the OSD on
# `memstore` (everything in memory, SIZE_MIB in all, default 512), pool size
# one, cephx on, no manager, no systemd. Every file lives under DIR (conf,
# keyring, monitor store, sockets, logs, pid files); nothing is written
# elsewhere. The state is thrown away: stop sends SIGKILL to the PIDs that
# start recorded in DIR/pids, and DIR may then be removed.
#
# Needs Debian's ceph-mon, ceph-osd and ceph-common (16.2). Every `ceph`
# command runs under a timeout: some wait forever for a manager that never
# comes.
set -euo pipefail

usage() { echo "usage: $0 start DIR [SIZE_MIB] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
# Client tools must not read a caller's keyring or arguments.
unset CEPH_KEYRING CEPH_ARGS CEPH_CONF

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

stop() {
  [ -f "$dir/pids" ] || return 0
  while read -r pid; do
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done <"$dir/pids"
  rm -f "$dir/pids"
}

c() { timeout 20 ceph -c "$dir/ceph.conf" "$@"; }

start() {
  local size_mib=${1:-512}
  for t in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd; do
    command -v "$t" >/dev/null || { echo "$t is not installed (ceph-mon, ceph-osd, ceph-common)" >&2; exit 3; }
  done
  if [ -f "$dir/pids" ]; then echo "$dir: a cluster was started there already; stop it first" >&2; exit 1; fi
  mkdir -p "$dir"/{mon/a,osd/0,run,log,crash}
  local fsid port store_conf
  case ${CEPH_STORE:-memstore} in
    memstore) store_conf="osd objectstore = memstore
memstore device bytes = $((size_mib << 20))" ;;
    # Small caches (the default autotunes towards 4 GiB per OSD); the block
    # device is a sparse file made at mkfs; fsync stays on (a kill must not
    # lose what the OSD acknowledged).
    bluestore) store_conf="osd objectstore = bluestore
bluestore block create = true
bluestore block size = $((size_mib << 20))
bluestore block db create = false
bluestore block wal create = false
bluestore cache autotune = false
bluestore cache size = 67108864
osd memory target = 536870912
bluestore fsck on mount = false" ;;
    *) echo "CEPH_STORE: memstore or bluestore" >&2; exit 2 ;;
  esac
  fsid=$(cat /proc/sys/kernel/random/uuid)
  port=$(free_port)
  cat >"$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
crash dir = $dir/crash
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.01
paxos min wait = 0.01
mon osd reporter subtree level = osd
$store_conf
osd data = $dir/osd/\$id
mon data = $dir/mon/\$id
osd heartbeat grace = 5
osd op thread timeout = 15
[client]
log file = /dev/null
admin socket =
CONF
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' \
    --cap mgr 'allow profile osd' >/dev/null
  monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
  ceph-mon -c "$dir/ceph.conf" -i a -f </dev/null >>"$dir/log/mon.stdout" 2>&1 &
  echo $! >>"$dir/pids"
  local osd_uuid
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  c osd new "$osd_uuid" 0 >/dev/null
  ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/osd.mkfs" 2>&1
  start_osd
  c osd pool create rbd 8 8 >/dev/null 2>&1
  c osd pool application enable rbd rbd >/dev/null 2>&1
  timeout 30 rbd -c "$dir/ceph.conf" pool init rbd
  local i
  for i in $(seq 1 300); do
    if timeout 5 rbd -c "$dir/ceph.conf" ls rbd >/dev/null 2>&1; then
      echo "CONF=$dir/ceph.conf"
      echo "KEYRING=$dir/keyring"
      echo "POOL=rbd"
      return 0
    fi
    sleep 0.1
  done
  echo "cluster in $dir did not come up; logs in $dir/log" >&2
  stop
  exit 1
}

# Starts osd.0; its PID goes to DIR/pids and DIR/osd.pid.
start_osd() {
  ceph-osd -c "$dir/ceph.conf" -i 0 -f </dev/null >>"$dir/log/osd.stdout" 2>&1 &
  echo $! >>"$dir/pids"
  echo $! >"$dir/osd.pid"
}

case $cmd in
  start) shift 2; start "$@" ;;
  stop) stop ;;
  osd-pause) kill -STOP "$(cat "$dir/osd.pid")" ;;
  osd-resume) kill -CONT "$(cat "$dir/osd.pid")" ;;
  osd-kill)
    grep -q 'objectstore = bluestore' "$dir/ceph.conf" || { echo "osd-kill needs CEPH_STORE=bluestore" >&2; exit 2; }
    pid=$(cat "$dir/osd.pid"); kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done ;;
  osd-restart) start_osd ;;
  *) usage ;;
esac
