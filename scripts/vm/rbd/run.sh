#!/usr/bin/env bash
# Issue #16 scenario 1 (rapid deployment) on NVMe in the guest harness: a
# golden raw image imported into the host's throwaway Ceph cluster
# (scripts/ceph/cluster.sh) and snapshotted; a QEMU 7.2 guest (TCG, the NVMe
# controller behind the emulated IOMMU, one namespace per overlay, virtio-net
# on QEMU's user networking) runs guest.sh: sluice, on the controller through
# VFIO, formats a qcow2 overlay whose backing file is
# rbd:rbd/golden@v1:conf=/etc/ceph/ceph.conf on each namespace, serves `sluice
# perf -w verify` rounds on every overlay while all of them are streamed at
# once, and closes them standalone. Then the host checks each namespace with
# qemu-img (check clean, no backing file, 32 MiB) and check.py (the golden
# image outside perf's range; inside it, perf's verify pattern for each
# sector's own offset or the golden image: the golden image plus its writes).
#
#   scripts/vm/rbd/run.sh
#
# Prints the guest's SLUICE-VM-RESULT line and the host's SLUICE-VM-HOST line;
# exits 0 only when both say PASS; 77 with a SLUICE-VM-SKIP line when the QEMU
# packages can be neither found nor downloaded, the Ceph daemons and tools are
# missing, or sluice was built without librbd.
# Environment as scripts/vm/run.sh (VM_TIMEOUT, SLUICE_PROFILE, VM_SMP, VM_MEM
# (default 1536M), VM_SKIP_BUILD, VM_RUN (default work/run-rbd)), and
# RBD_OVERLAYS (10), PERF_TIME (seconds per perf round in the guest, 10),
# STREAM_SPEED (bytes/s per stream, 8 MiB/s; 0: unlimited).
set -euo pipefail
RHERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib.sh
source "$RHERE/../lib.sh"
HERE=$VM_DIR
RUN=${VM_RUN:-$WORK/run-rbd}
MEM=${VM_MEM:-1536M}
N=${RBD_OVERLAYS:-10}
SIZE=$((32 << 20))
PERF_OFF=$((4 << 20)) PERF_LEN=$((4 << 20))
BACKING="rbd:rbd/golden@v1:conf=/etc/ceph/ceph.conf"
NET_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover
    net_failover virtio_net"

ceph_missing() { # why the Ceph side cannot run here, if it cannot
    local t
    for t in ceph-mon ceph-osd ceph rbd; do
        command -v "$t" >/dev/null || { echo "$t is not installed (ceph-mon, ceph-osd, ceph-common)"; return; }
    done
    # grep reads all of ldd's output: `grep -q` would stop at the first
    # match and, under pipefail, ldd's SIGPIPE would fail the pipeline (about
    # one check in ten said "built without librbd" of a binary linking it).
    ldd "$1" | grep librbd >/dev/null || echo "sluice was built without librbd (librbd-dev, librados-dev)"
}

# The cluster, the golden image (8 MiB of data in 1 MiB pieces, holes between)
# imported and snapshotted, and what the guest's librbd needs: a conf naming
# the monitor as the cluster's own does, the keyring, and the ports to forward
# (the monitor's first, then the OSD's public ones).
make_cluster() {
    local out cmds=() i
    out=$(timeout 120 "$ROOT/scripts/ceph/cluster.sh" start "$RUN/ceph" 256) ||
        { log "the Ceph cluster did not start"; exit 1; }
    CONF=$(echo "$out" | sed -n 's/^CONF=//p')
    qemu-img create -q -f raw "$RUN/golden.raw" "$SIZE"
    for i in 0 1 2 3 4 5 6 7; do cmds+=(-c "write -P $((0x10 + i)) $((i * 4 + 1))M 1M"); done
    qemu-io -f raw "${cmds[@]}" "$RUN/golden.raw" >/dev/null
    timeout 120 rbd -c "$CONF" import --no-progress "$RUN/golden.raw" rbd/golden
    timeout 60 rbd -c "$CONF" snap create --no-progress rbd/golden@v1
    local mon osd
    mon=$(sed -n 's/^mon host = \[v2:127\.0\.0\.1:\([0-9]*\)\]$/\1/p' "$CONF")
    osd=$(timeout 30 ceph -c "$CONF" osd dump --format json | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(" ".join(a["addr"].rsplit(":", 1)[1] for o in d["osds"] for a in o["public_addrs"]["addrvec"]))')
    [[ -n $mon && -n $osd ]] || { log "cannot read the monitor's and the OSD's ports"; exit 1; }
    mkdir -p "$RUN/etc-ceph"
    printf "%s\n" $mon $osd > "$RUN/etc-ceph/ports" # one a line, the monitor first
    cp "$RUN/ceph/keyring" "$RUN/etc-ceph/keyring"
    cat > "$RUN/etc-ceph/ceph.conf" <<CONF
[global]
mon host = [v2:127.0.0.1:$mon]
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = /etc/ceph/keyring
ms bind ipv6 = false
log file = /dev/null
admin socket =
CONF
    log "cluster up: monitor 127.0.0.1:$mon, OSD ports $osd; golden image rbd/golden@v1"
}

rbd_initramfs() {
    local stage="$RUN/initramfs" target=$1
    stage_initramfs "$stage" $NVME_MODULES $NET_MODULES
    mkdir -p "$stage"/{scripts,etc}
    copy_with_libs "$target/sluice" "$stage"
    install -m 0755 "$HERE/init.sh" "$stage/init"
    install -m 0755 "$RHERE/guest.sh" "$stage/scenario.sh"
    install -m 0755 "$ROOT/scripts/setup.sh" "$stage/scripts/setup.sh"
    cp -r "$RUN/etc-ceph" "$stage/etc/ceph"
    cat > "$stage/etc/rbd-scenario.env" <<ENV
N=$N
SIZE=$SIZE
BACKING='$BACKING'
PERF_OFF=$PERF_OFF
PERF_LEN=$PERF_LEN
PERF_TIME=${PERF_TIME:-10}
STREAM_SPEED=${STREAM_SPEED:-$((8 << 20))}
ENV
    python3 "$HERE/mkinitramfs.py" "$stage" "$RUN/initrd.gz"
}

# Each namespace: a clean qcow2 image (qemu-img check exits 0: the guest
# closed them), no backing file, 32 MiB, the golden image plus perf's writes.
rbd_host_checks() {
    local i img out rc why=() checked=()
    for i in $(seq 1 "$N"); do
        img="$RUN/ns$i.img"
        rc=0
        out=$(qemu-img check -f qcow2 "$img" 2>&1) || rc=$?
        [[ $rc == 0 ]] || { why+=("namespace $i: qemu-img check exit $rc: $(echo "$out" | tr '\n' ' ')"); continue; }
        out=$(qemu-img info -f qcow2 "$img")
        if grep "^backing file" <<<"$out" >/dev/null; then why+=("namespace $i still has a backing file"); fi
        grep "^virtual size: 32 MiB" <<<"$out" >/dev/null || why+=("namespace $i: $(echo "$out" | grep '^virtual size')")
        rc=0
        out=$(timeout 120 python3 "$RHERE/check.py" "$RUN/golden.raw" "$img" "$PERF_OFF" "$PERF_LEN" 2>&1) || rc=$?
        log "namespace $i: ${out##*$'\n'}"
        [[ $rc == 0 ]] && checked+=("$i") || why+=("namespace $i: ${out##*$'\n'}")
    done
    if ((${#why[@]})); then
        echo "SLUICE-VM-HOST: FAIL ${why[*]}"
        return 1
    fi
    echo "SLUICE-VM-HOST: PASS ${#checked[@]} overlays qemu-img check clean, standalone, equal to the golden image plus perf's writes"
}

rbd_main() {
    local target why
    target=$(bin_dir)
    prepare_guest
    build_sluice
    [[ -x $target/sluice ]] || { log "$target/sluice is not built"; exit 1; }
    why=$(ceph_missing "$target/sluice")
    [[ -z $why ]] || skip "$why"
    rm -rf "$RUN/ceph" "$RUN/etc-ceph"
    trap '"$ROOT/scripts/ceph/cluster.sh" stop "$RUN/ceph" || true' EXIT
    make_cluster
    rbd_initramfs "$target"
    local ns=() i
    for i in $(seq 1 "$N"); do
        rm -f "$RUN/ns$i.img"
        truncate -s 40M "$RUN/ns$i.img"
        ns+=(-drive "file=$RUN/ns$i.img,if=none,id=ns$i,format=raw" -device "nvme-ns,drive=ns$i,bus=nvme0,nsid=$i")
    done
    boot_nvme_guest "^(scenario|init|setup|vm)" "${ns[@]}" \
        -netdev user,id=net0 -device virtio-net-pci,netdev=net0,romfile=
    rbd_host_checks
}

rbd_main; exit # one line: bash reads no further, even if this file changes while it runs
