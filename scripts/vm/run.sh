#!/usr/bin/env bash
# Boots a QEMU (TCG) guest with an emulated NVMe controller (two namespaces)
# behind the emulated Intel IOMMU and runs sluice's NVMe scenario in it; then
# checks on the host, with qemu-img, the qcow2 images the guest left on the
# namespaces. Prints the guest's SLUICE-VM-RESULT line and the host's
# SLUICE-VM-HOST line; exits 0 only when both say PASS, 77 (and a
# SLUICE-VM-SKIP line) when the QEMU packages can be neither found in the cache
# nor downloaded.
#
#   scripts/vm/run.sh [SCENARIO.sh] [EXTRA.sh ...]
#
# SCENARIO defaults to scripts/vm/scenario.sh; EXTRA scripts are sourced by the
# scenario while the service runs (with $S = sluice, $NVME = the PCI address).
# Nothing is installed on the host: the Debian packages (kernel, QEMU 7.2,
# busybox) are downloaded with `apt-get download` into scripts/vm/cache and
# unpacked with `dpkg -x` into scripts/vm/work.
# The guest gets a qcow2 chain made here with qemu-img/qemu-io (/data/base.qcow2
# <- /data/top.qcow2); namespace 1 (work/run/ns1.img) and namespace 2
# (work/run/ns2.img) hold what the guest wrote.
# Environment: VM_TIMEOUT (seconds, default 900), SLUICE_PROFILE (release; dev
# for debug builds), VM_SMP (2), VM_MEM (1G), VM_KEEP_LOG (path for the console
# log), VM_SKIP_BUILD=1 (use the binaries already built), VM_RUN (folder for
# this run's initramfs, chain, namespaces and console log; default work/run).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
RUN=${VM_RUN:-$WORK/run}
MEM=${VM_MEM:-1G}
SCENARIO=${1:-$HERE/scenario.sh}
shift || true

build() {
    build_sluice
    [[ ${VM_SKIP_BUILD:-0} == 1 ]] && return
    log "building nvme_guest ($PROFILE)"
    (cd "$ROOT" && cargo build -q --profile "$PROFILE" -p bdev --example nvme_guest)
}

# The backing chain the guest copies live onto namespace 2, made with the host's
# qemu-img and qemu-io (QEMU is the oracle): data in the base only, in the top
# only, top over base, a zeroed range over base data, data at the end.
make_chain() {
    local d="$RUN/chain"
    rm -rf "$d"
    mkdir -p "$d"
    qemu-img create -q -f qcow2 "$d/base.qcow2" 64M
    qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x22 4M 2M' -c 'write -P 0x33 63M 1M' \
        "$d/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/top.qcow2"
    qemu-io -f qcow2 -c 'write -P 0x44 512k 1M' -c 'write -z 5M 512k' -c 'write -P 0x55 32M 64k' \
        -c 'write -P 0x66 40M 3M' "$d/top.qcow2" >/dev/null
}

initramfs() {
    local stage="$RUN/initramfs" target
    target=$(bin_dir)
    stage_initramfs "$stage" $NVME_MODULES
    mkdir -p "$stage"/{scripts,scenario.d,data}
    copy_with_libs "$target/sluice" "$stage"
    copy_with_libs "$target/examples/nvme_guest" "$stage"
    install -m 0755 "$HERE/init.sh" "$stage/init"
    install -m 0755 "$SCENARIO" "$stage/scenario.sh"
    install -m 0755 "$ROOT/scripts/setup.sh" "$stage/scripts/setup.sh"
    cp "$RUN/chain/base.qcow2" "$RUN/chain/top.qcow2" "$stage/data/"
    local i=0
    for extra in "$@"; do
        i=$((i + 1))
        install -m 0644 "$extra" "$stage/scenario.d/$(printf %02d $i)-$(basename "$extra")"
    done
    python3 "$HERE/mkinitramfs.py" "$stage" "$RUN/initrd.gz"
}

# The images the guest left behind, checked with qemu-img: namespace 1 holds the
# qcow2 image sluice created and wrote through perf -w verify (consistent: leaked
# clusters, which an unclean exit may leave, are allowed; errors are not);
# namespace 2 holds the live copy of the chain, which must be a clean qcow2
# image without a backing file whose guest-visible contents equal the chain's.
host_checks() {
    local ns1="$RUN/ns1.img" ns2="$RUN/ns2.img" out rc=0 why=()
    out=$(qemu-img check -f qcow2 "$ns1" 2>&1) || rc=$?
    log "qemu-img check of the qcow2 image on namespace 1 (exit $rc): $(echo "$out" | tr '\n' ' ')"
    [[ $rc == 0 || $rc == 3 ]] || why+=("namespace 1: qemu-img check exit $rc")
    local leaks=$((rc == 3))
    rc=0
    out=$(qemu-img check -f qcow2 "$ns2" 2>&1) || rc=$?
    log "qemu-img check of the live copy on namespace 2 (exit $rc): $(echo "$out" | tr '\n' ' ')"
    [[ $rc == 0 ]] || why+=("namespace 2: qemu-img check exit $rc")
    # (grep reads it all: under pipefail, `grep -q`'s early exit could fail
    # the pipeline with qemu-img's SIGPIPE and hide the backing file.)
    if qemu-img info -f qcow2 "$ns2" | grep "^backing file" >/dev/null; then
        why+=("namespace 2 still has a backing file")
    fi
    rc=0
    out=$(qemu-img compare -f qcow2 -F qcow2 "$ns2" "$RUN/chain/top.qcow2" 2>&1) || rc=$?
    log "qemu-img compare live copy vs chain (exit $rc): $(echo "$out" | tr '\n' ' ' | sed 's/\[#*\].*//')"
    [[ $rc == 0 ]] || why+=("live copy differs from the chain (qemu-img compare exit $rc)")
    if ((${#why[@]})); then
        echo "SLUICE-VM-HOST: FAIL ${why[*]}"
        return 1
    fi
    echo "SLUICE-VM-HOST: PASS qcow2 on namespace 1 consistent$( ((leaks)) && echo ' (leaked clusters only)'), live copy on namespace 2 clean, standalone and identical to the chain"
}

main() {
    prepare_guest
    build
    make_chain
    initramfs "$@"
    rm -f "$RUN/ns1.img" "$RUN/ns2.img"
    truncate -s 256M "$RUN/ns1.img"
    truncate -s 128M "$RUN/ns2.img"
    boot_nvme_guest "^(scenario|nvme_guest|init|setup|NVME-GUEST|vm)" \
        -drive file="$RUN/ns1.img",if=none,id=ns1,format=raw -device nvme-ns,drive=ns1,bus=nvme0,nsid=1 \
        -drive file="$RUN/ns2.img",if=none,id=ns2,format=raw -device nvme-ns,drive=ns2,bus=nvme0,nsid=2
    host_checks
}

main "$@"
