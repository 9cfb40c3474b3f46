#!/usr/bin/env bash
# The steps every guest harness shares (scripts/vm/run.sh, vhost/run.sh,
# rbd/run.sh, scripts/bench/vhost.sh source it): the settings from the
# environment, the Debian packages fetched into $CACHE and unpacked into
# $WORK/root under a lock concurrent runs share (prepare_guest), the
# uncompressed kernel, sluice built in the workspace's feature set
# (build_sluice), an initramfs's busybox, modules and binaries
# (stage_initramfs, copy_with_libs), and an NVMe guest booted under TCG with
# its verdict line read from the console (boot_nvme_guest).
# Environment: VM_CACHE, VM_WORK, VM_TIMEOUT (seconds, default 900),
# SLUICE_PROFILE (release; dev for debug builds), VM_SMP (2), VM_SKIP_BUILD=1
# (use the binaries already built), CARGO_TARGET_DIR. The caller sets RUN
# (this run's folder) and MEM.
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$VM_DIR/../.." && pwd)
CACHE=${VM_CACHE:-$VM_DIR/cache}
WORK=${VM_WORK:-$VM_DIR/work}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
TIMEOUT=${VM_TIMEOUT:-900}
PROFILE=${SLUICE_PROFILE:-release}
SMP=${VM_SMP:-2}
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

copy_with_libs() { # binary dest-root: the binary (without its debug info) and the libraries it links
    local bin=$1 dst=$2 out
    out="$dst/usr/bin/$(basename "$bin")"
    install -D -m 0755 "$bin" "$out"
    if command -v strip >/dev/null; then strip --strip-debug "$out"; fi
    ldd "$bin" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
        [[ -e $dst$lib ]] || install -D -m 0755 "$(readlink -f "$lib")" "$dst$lib"
    done
}

# The folder cargo puts $PROFILE's binaries in.
bin_dir() {
    if [[ $PROFILE == dev ]]; then echo "$TARGET/debug"; else echo "$TARGET/$PROFILE"; fi
}

# sluice's binaries, unless VM_SKIP_BUILD=1, built as scripts/test.sh builds
# them (`--workspace --bins`: the workspace's feature set). Built with the
# features of `-p sluice` alone, the binary could differ and be relinked
# under a guest test that is copying it meanwhile.
build_sluice() {
    [[ ${VM_SKIP_BUILD:-0} == 1 ]] && return
    log "building sluice ($PROFILE)"
    (cd "$ROOT" && cargo build -q --profile "$PROFILE" --workspace --bins)
}

# Fetches and unpacks the packages (under the lock concurrent runs share)
# and sets KVER (the kernel's version) and KERNEL (the uncompressed kernel).
prepare_guest() {
    mkdir -p "$WORK" "$RUN"
    local kpkg
    exec 9> "$WORK/.lock"
    flock 9
    kpkg=$(fetch)
    unpack
    KVER=${kpkg#linux-image-}
    KERNEL=$(vmlinux)
    flock -u 9
    exec 9>&-
}

# A fresh initramfs tree at $1 with busybox and the kernel modules named
# after it (the first of each name in $KVER's tree).
stage_initramfs() {
    local stage=$1 m f
    shift
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,lib/modules}
    cp "$WORK/root/bin/busybox" "$stage/bin/busybox"
    for m in "$@"; do
        f=$(find "$WORK/root/lib/modules/$KVER" -name "$m.ko" | head -1)
        [[ -n $f ]] || { log "module $m missing from the kernel package"; exit 1; }
        cp "$f" "$stage/lib/modules/$m.ko"
    done
}

# The modules an NVMe guest loads to bind its controller to vfio-pci.
NVME_MODULES="crc64 crc64-rocksoft crct10dif_common crc-t10dif t10-pi nvme-core nvme vfio irqbypass
    vfio_virqfd vfio-pci-core vfio-pci vfio_iommu_type1"

# Boots $RUN/initrd.gz on $KERNEL under TCG with an NVMe controller (nvme0)
# behind the emulated Intel IOMMU, the namespaces and devices in the
# arguments after the first; the console goes to $VM_KEEP_LOG or
# $RUN/console.log, and its lines matching the extended regex $1 to stderr.
# Prints the guest's SLUICE-VM-RESULT line; exits 1 unless it says PASS.
boot_nvme_guest() {
    local show=$1 R="$WORK/root" out="${VM_KEEP_LOG:-$RUN/console.log}" start=$SECONDS rc=0 line
    shift
    log "booting the guest (TCG, timeout ${TIMEOUT}s); console in $out"
    LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu timeout "$TIMEOUT" "$R/usr/bin/qemu-system-x86_64" \
        -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" -nodefaults -display none \
        -serial stdio -no-reboot -m "$MEM" -smp "$SMP" -machine q35,accel=tcg -cpu max \
        -device intel-iommu,intremap=on,caching-mode=on \
        -device nvme,id=nvme0,serial=deadbeef "$@" \
        -initrd "$RUN/initrd.gz" -kernel "$KERNEL" \
        -append 'console=ttyS0 intel_iommu=on iommu=pt quiet panic=-1' < /dev/null > "$out" 2>&1 || rc=$?
    line=$(grep -a "^SLUICE-VM-RESULT:" "$out" | tail -1 | tr -d '\r' || true)
    grep -a -E "$show" "$out" | tr -d '\r' >&2 || true
    if [[ -z $line ]]; then
        tail -n 40 "$out" >&2
        echo "SLUICE-VM-RESULT: FAIL no result line (qemu exit $rc after $((SECONDS - start)) s)"
        exit 1
    fi
    echo "$line (guest ran $((SECONDS - start)) s under TCG)"
    [[ $line == "SLUICE-VM-RESULT: PASS"* ]] || exit 1
}
