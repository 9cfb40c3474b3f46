#!/usr/bin/env bash
# Boots a QEMU (TCG) guest with an emulated NVMe controller behind the emulated
# Intel IOMMU and runs sluice's NVMe scenario in it; prints the guest's
# SLUICE-VM-RESULT line and exits 0 only on PASS.
#
#   scripts/vm/run.sh [SCENARIO.sh] [EXTRA.sh ...]
#
# SCENARIO defaults to scripts/vm/scenario.sh; EXTRA scripts are sourced by the
# scenario while the service runs (with $S = sluice, $NVME = the PCI address).
# Nothing is installed on the host: the Debian packages (kernel, QEMU 7.2,
# busybox) are downloaded into scripts/vm/cache and unpacked into scripts/vm/work.
# Environment: VM_TIMEOUT (seconds, default 900), SLUICE_PROFILE (release),
# VM_SMP (2), VM_MEM (1G), VM_KEEP_LOG (path for the console log).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${VM_CACHE:-$HERE/cache}
WORK=${VM_WORK:-$HERE/work}
TIMEOUT=${VM_TIMEOUT:-900}
PROFILE=${SLUICE_PROFILE:-release}
SMP=${VM_SMP:-2}
MEM=${VM_MEM:-1G}
SCENARIO=${1:-$HERE/scenario.sh}
shift || true
PKGS_FIXED="qemu-system-x86 qemu-system-common qemu-system-data seabios busybox-static libcapstone4 libfdt1 libslirp0 libvdeplug2"

log() { echo "vm: $*" >&2; }

fetch() {
    mkdir -p "$CACHE"
    local kpkg
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -z $kpkg ]]; then
        log "apt lists are empty: apt-get update"
        apt-get update -qq
        kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [[ -n $kpkg ]] || { log "cannot find the Debian kernel package"; exit 1; }
    local missing=()
    for p in $kpkg $PKGS_FIXED; do
        compgen -G "$CACHE/${p}_*.deb" >/dev/null || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "downloading ${missing[*]}"
        (cd "$CACHE" && apt-get download "${missing[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" >&2) ||
            { apt-get update -qq && (cd "$CACHE" && apt-get download "${missing[@]}"); }
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
    (cd "$ROOT" && cargo build -q --profile "$PROFILE" -p rpc --bin sluice && cargo build -q --profile "$PROFILE" -p bdev --example nvme_guest)
}

copy_with_libs() { # binary dest-root
    local bin=$1 dst=$2
    install -D -m 0755 "$bin" "$dst/usr/bin/$(basename "$bin")"
    ldd "$bin" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
        [[ -e $dst$lib ]] || install -D -m 0755 "$(readlink -f "$lib")" "$dst$lib"
    done
}

initramfs() {
    local kver=$1 stage="$WORK/initramfs" target="$ROOT/target/$PROFILE"
    shift
    [[ $PROFILE == dev ]] && target="$ROOT/target/debug"
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
    local i=0
    for extra in "$@"; do
        i=$((i + 1))
        install -m 0644 "$extra" "$stage/scenario.d/$(printf %02d $i)-$(basename "$extra")"
    done
    python3 "$HERE/mkinitramfs.py" "$stage" "$WORK/initrd.gz"
}

main() {
    mkdir -p "$WORK"
    local kpkg kver kernel
    kpkg=$(fetch)
    unpack
    kver=${kpkg#linux-image-}
    kernel=$(vmlinux)
    [[ ${VM_SKIP_BUILD:-0} == 1 ]] || build
    initramfs "$kver" "$@"
    rm -f "$WORK/nvme.img"
    truncate -s 256M "$WORK/nvme.img"
    local R="$WORK/root" out="${VM_KEEP_LOG:-$WORK/console.log}"
    log "booting the guest (TCG, timeout ${TIMEOUT}s); console in $out"
    local start=$SECONDS rc=0
    LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu timeout "$TIMEOUT" "$R/usr/bin/qemu-system-x86_64" \
        -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" -nodefaults -display none \
        -serial stdio -no-reboot -m "$MEM" -smp "$SMP" -machine q35,accel=tcg -cpu max \
        -device intel-iommu,intremap=on,caching-mode=on \
        -drive file="$WORK/nvme.img",if=none,id=nvm,format=raw -device nvme,serial=deadbeef,drive=nvm \
        -initrd "$WORK/initrd.gz" -kernel "$kernel" \
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
    [[ $line == "SLUICE-VM-RESULT: PASS"* ]]
}

main "$@"
