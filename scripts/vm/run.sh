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
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${VM_CACHE:-$HERE/cache}
WORK=${VM_WORK:-$HERE/work}
RUN=${VM_RUN:-$WORK/run}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TIMEOUT=${VM_TIMEOUT:-900}
PROFILE=${SLUICE_PROFILE:-release}
SMP=${VM_SMP:-2}
MEM=${VM_MEM:-1G}
SCENARIO=${1:-$HERE/scenario.sh}
shift || true
PKGS_FIXED="qemu-system-x86 qemu-system-common qemu-system-data seabios busybox-static libcapstone4 libfdt1 libslirp0 libvdeplug2"

log() { echo "vm: $*" >&2; }

skip() { # the packages cannot be had: not a failure of sluice (stderr: fetch runs in $(...))
    echo "SLUICE-VM-SKIP: $*" >&2
    exit 77
}

kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

fetch() {
    mkdir -p "$CACHE"
    local kpkg
    kpkg=$(kernel_pkg)
    if [[ -z $kpkg ]]; then
        log "apt lists are empty: apt-get update"
        apt-get update -qq >&2 || true
        kpkg=$(kernel_pkg)
    fi
    if [[ -z $kpkg ]]; then # no lists and no network: a kernel already in the cache will do
        local cached
        cached=$(ls "$CACHE"/linux-image-[0-9]*_amd64.deb 2>/dev/null | head -1)
        [[ -n $cached ]] || skip "cannot find the Debian kernel package (no apt lists, no network?)"
        kpkg=$(basename "$cached" | cut -d_ -f1)
    fi
    local missing=()
    for p in $kpkg $PKGS_FIXED; do
        compgen -G "$CACHE/${p}_*.deb" >/dev/null || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "downloading ${missing[*]}"
        if ! (cd "$CACHE" && apt-get download "${missing[@]}" >&2 2>/dev/null); then
            apt-get update -qq >&2 || true
            (cd "$CACHE" && apt-get download "${missing[@]}" >&2) ||
                skip "cannot download ${missing[*]} (apt-get download failed: no network?)"
        fi
    fi
    echo "$kpkg"
}

unpack() {
    local stamp="$WORK/root/.unpacked-$(ls "$CACHE" | md5sum | cut -c1-12)"
    if [[ ! -e $stamp ]]; then
        log "unpacking packages"
        rm -rf "$WORK/root"
        mkdir -p "$WORK/root"
        for d in "$CACHE"/*.deb; do dpkg -x "$d" "$WORK/root"; done
        touch "$stamp"
    fi
}

vmlinux() { # uncompressed kernel: boots twice as fast under TCG
    local vmlinuz out="$WORK/vmlinux"
    vmlinuz=$(ls "$WORK"/root/boot/vmlinuz-* | head -1)
    if [[ ! -s $out || $out -ot $vmlinuz ]]; then
        local off
        off=$(python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); print(d.find(b"\xfd7zXZ\x00"))' "$vmlinuz")
        if [[ $off -ge 0 ]] && tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream > "$out.tmp" 2>/dev/null; then
            mv "$out.tmp" "$out"
        else
            rm -f "$out.tmp"
            cp "$vmlinuz" "$out"
        fi
    fi
    echo "$out"
}

build() {
    log "building sluice and nvme_guest ($PROFILE)"
    (cd "$ROOT" && cargo build -q --profile "$PROFILE" -p sluice --bin sluice &&
        cargo build -q --profile "$PROFILE" -p bdev --example nvme_guest)
}

copy_with_libs() { # binary dest-root: the binary (without its debug info) and the libraries it links
    local bin=$1 dst=$2 out
    out="$dst/usr/bin/$(basename "$bin")"
    install -D -m 0755 "$bin" "$out"
    if command -v strip >/dev/null; then strip --strip-debug "$out"; fi
    ldd "$bin" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
        [[ -e $dst$lib ]] || install -D -m 0755 "$(readlink -f "$lib")" "$dst$lib"
    done
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
    local kver=$1 stage="$RUN/initramfs" target="$TARGET/$PROFILE"
    shift
    [[ $PROFILE == dev ]] && target="$TARGET/debug"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,lib/modules,scripts,scenario.d}
    cp "$WORK/root/bin/busybox" "$stage/bin/busybox"
    for m in crc64 crc64-rocksoft crct10dif_common crc-t10dif t10-pi nvme-core nvme vfio irqbypass \
             vfio_virqfd vfio-pci-core vfio-pci vfio_iommu_type1; do
        local f
        f=$(find "$WORK/root/lib/modules/$kver" -name "$m.ko" | head -1)
        [[ -n $f ]] || { log "module $m missing from the kernel package"; exit 1; }
        cp "$f" "$stage/lib/modules/$m.ko"
    done
    copy_with_libs "$target/sluice" "$stage"
    copy_with_libs "$target/examples/nvme_guest" "$stage"
    install -m 0755 "$HERE/init.sh" "$stage/init"
    install -m 0755 "$SCENARIO" "$stage/scenario.sh"
    install -m 0755 "$ROOT/scripts/setup.sh" "$stage/scripts/setup.sh"
    mkdir -p "$stage/data"
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
    if qemu-img info -f qcow2 "$ns2" | grep -q "^backing file"; then
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
    mkdir -p "$WORK" "$RUN"
    local kpkg kver kernel
    # The cache and the unpacked packages are shared by concurrent runs.
    exec 9> "$WORK/.lock"
    flock 9
    kpkg=$(fetch)
    unpack
    kver=${kpkg#linux-image-}
    kernel=$(vmlinux)
    flock -u 9
    [[ ${VM_SKIP_BUILD:-0} == 1 ]] || build
    make_chain
    initramfs "$kver" "$@"
    rm -f "$RUN/ns1.img" "$RUN/ns2.img"
    truncate -s 256M "$RUN/ns1.img"
    truncate -s 128M "$RUN/ns2.img"
    local R="$WORK/root" out="${VM_KEEP_LOG:-$RUN/console.log}"
    log "booting the guest (TCG, timeout ${TIMEOUT}s); console in $out"
    local start=$SECONDS rc=0
    LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu timeout "$TIMEOUT" "$R/usr/bin/qemu-system-x86_64" \
        -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" -nodefaults -display none \
        -serial stdio -no-reboot -m "$MEM" -smp "$SMP" -machine q35,accel=tcg -cpu max \
        -device intel-iommu,intremap=on,caching-mode=on \
        -device nvme,id=nvme0,serial=deadbeef \
        -drive file="$RUN/ns1.img",if=none,id=ns1,format=raw -device nvme-ns,drive=ns1,bus=nvme0,nsid=1 \
        -drive file="$RUN/ns2.img",if=none,id=ns2,format=raw -device nvme-ns,drive=ns2,bus=nvme0,nsid=2 \
        -initrd "$RUN/initrd.gz" -kernel "$kernel" \
        -append 'console=ttyS0 intel_iommu=on iommu=pt quiet panic=-1' < /dev/null > "$out" 2>&1 || rc=$?
    local line
    line=$(grep -a "^SLUICE-VM-RESULT:" "$out" | tail -1 | tr -d '\r' || true)
    grep -a -E "^(scenario|nvme_guest|init|setup|NVME-GUEST|vm)" "$out" | tr -d '\r' >&2 || true
    if [[ -z $line ]]; then
        tail -n 40 "$out" >&2
        echo "SLUICE-VM-RESULT: FAIL no result line (qemu exit $rc after $((SECONDS - start)) s)"
        exit 1
    fi
    echo "$line (guest ran $((SECONDS - start)) s under TCG)"
    [[ $line == "SLUICE-VM-RESULT: PASS"* ]] || exit 1
    host_checks
}

# Sourced by scripts/vm/vhost/run.sh for its helpers (fetch, unpack, vmlinux, copy_with_libs).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
