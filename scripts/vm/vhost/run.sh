#!/usr/bin/env bash
# A QEMU 7.2 guest (TCG, Debian kernel, busybox initramfs) whose data disk
# sluice serves, and which never notices the disk moving under it:
#
#   scripts/vm/vhost/run.sh vhost|nbd
#
# vhost: the disk is a vhost-user-blk export (2 queues; guest memory a shared
#        memfd backend); nbd: an NBD export that QEMU's own nbd client reaches,
#        behind a virtio-blk device. In the guest (guest.sh) an ext4 file system
#        is made and files are written and rewritten with checksums in a loop
#        while the host (host.py) runs blockdev-snapshot-sync, block-stream, a
#        mirror with pivot and an active commit with pivot under it; then the
#        guest verifies every file, runs fsck -n and checks its kernel log; the
#        host checks the final image with qemu-img and compares its contents
#        with the guest's disk.
# Prints SLUICE-VM-RESULT (guest) and SLUICE-VM-HOST (host) lines; exits 0 only
# when both say PASS, 77 (SLUICE-VM-SKIP) when the QEMU packages can be neither
# found in scripts/vm/cache nor downloaded. The guest's e2fsprogs are the
# host's (e2fsprogs is Priority: required in Debian, so always installed; the
# same Debian 12 binaries the guest kernel's userland expects).
# Environment as scripts/vm/run.sh (VM_TIMEOUT, SLUICE_PROFILE, VM_SMP, VM_MEM
# (default 512M), VM_SKIP_BUILD, VM_RUN).
set -euo pipefail
VHERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=${1:-vhost}
if [[ ${BASH_SOURCE[0]} == "$0" ]] && [[ $MODE != vhost && $MODE != nbd ]]; then
    echo "usage: $0 vhost|nbd" >&2
    exit 2
fi
# shellcheck source=../lib.sh
source "$VHERE/../lib.sh"
HERE=$VM_DIR
RUN=${VM_RUN:-$WORK/run-$MODE}
MEM=${VM_MEM:-512M}
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4"

# The guest's initramfs (after prepare_guest: $KVER).
guest_initramfs() {
    local stage="$RUN/initramfs"
    stage_initramfs "$stage" $MODULES
    mkdir -p "$stage"/{etc,usr/bin}
    echo "$MODULES" > "$stage/lib/modules/load.list"
    local mke2fs e2fsck
    mke2fs=$(command -v mke2fs || echo /sbin/mke2fs)
    e2fsck=$(command -v e2fsck || echo /sbin/e2fsck)
    [[ -x $mke2fs && -x $e2fsck ]] || { log "e2fsprogs (mke2fs, e2fsck) not found on the host"; exit 1; }
    copy_with_libs "$mke2fs" "$stage"
    copy_with_libs "$e2fsck" "$stage"
    ln -s mke2fs "$stage/usr/bin/mkfs.ext4"
    ln -s e2fsck "$stage/usr/bin/fsck.ext4"
    [[ -e /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$stage/etc/"
    install -m 0755 "$VHERE/init.sh" "$stage/init"
    install -m 0755 "$VHERE/guest.sh" "$stage/guest.sh"
    install -m 0755 "$VHERE/bench.sh" "$stage/bench.sh"
    # The benchmark's reader (scripts/bench/vhost.sh compiles it), when there.
    [[ -x $RUN/randread ]] && install -D -m 0755 "$RUN/randread" "$stage/usr/bin/randread"
    python3 "$HERE/mkinitramfs.py" "$stage" "$RUN/initrd.gz"
}

vhost_main() {
    local target
    target=$(bin_dir)
    prepare_guest
    build_sluice
    guest_initramfs
    local py="$ROOT/.venv/bin/python"
    [[ -x $py ]] || py=python3
    rm -rf "$RUN/rd"
    "$target/sluice" serve --runtime-dir "$RUN/rd" --no-pin -m 0x1 2> "$RUN/sluice.log" &
    local spid=$!
    for _ in $(seq 200); do [[ -S $RUN/rd/sluice-qmp.sock ]] && break; sleep 0.05; done
    local R="$WORK/root" rc=0
    LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu timeout "$TIMEOUT" "$py" "$VHERE/host.py" \
        --qmp "$RUN/rd/sluice-qmp.sock" --run "$RUN" --mode "$MODE" --mem "$MEM" --timeout "$TIMEOUT" -- \
        "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" -nodefaults \
        -display none -serial stdio -no-reboot -m "$MEM" -smp "$SMP" -machine q35,accel=tcg -cpu max \
        -initrd "$RUN/initrd.gz" -kernel "$KERNEL" \
        -append 'console=ttyS0 quiet panic=-1' || rc=$?
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    grep -a -E "^(guest|init):" "$RUN/console.log" | tr -d '\r' >&2 || true
    if grep -q panicked "$RUN/sluice.log"; then
        grep -B2 -A10 panicked "$RUN/sluice.log" >&2
        echo "SLUICE-VM-HOST: FAIL sluice panicked"
        exit 1
    fi
    exit "$rc"
}

# scripts/bench/vhost.sh sources this file for guest_initramfs (and lib.sh's helpers).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then vhost_main; fi
