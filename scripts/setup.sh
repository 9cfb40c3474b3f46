#!/bin/sh
# Prepare a machine for sluice's userspace NVMe driver, in the manner of SPDK's
# scripts/setup.sh: reserve hugepages and bind NVMe controllers to vfio-pci
# (through driver_override), show the state, or give the devices back to the
# kernel's nvme driver. POSIX sh: runs under bash, dash and busybox.
#
#   scripts/setup.sh [config]   reserve HUGEMEM MiB of hugepages, bind NVMe devices to vfio-pci
#   scripts/setup.sh status     hugepages and NVMe devices with their drivers
#   scripts/setup.sh reset      rebind NVMe devices to the kernel driver
#   scripts/setup.sh help
#
# Environment:
#   HUGEMEM        MiB of hugepages to reserve (default 2048)
#   PCI_ALLOWED    space-separated PCI addresses to act on (default: every NVMe device)
#   PCI_BLOCKED    space-separated PCI addresses to leave alone
#   CLEAR_HUGE     with "reset": also release the hugepages (yes/no, default no)
#   SYSFS, PROCFS  sysfs and procfs roots (default /sys and /proc; for tests)
set -eu

SYSFS=${SYSFS:-/sys}
PROCFS=${PROCFS:-/proc}
HUGEMEM=${HUGEMEM:-2048}
PCI_ALLOWED=${PCI_ALLOWED:-${PCI_WHITELIST:-}}
PCI_BLOCKED=${PCI_BLOCKED:-${PCI_BLACKLIST:-}}
CLEAR_HUGE=${CLEAR_HUGE:-no}
NVME_CLASS=0x010802

die() { echo "setup.sh: $*" >&2; exit 1; }
warn() { echo "setup.sh: $*" >&2; }

normalize() { # 00:04.0 -> 0000:00:04.0
    a=$(echo "$1" | tr 'A-F' 'a-f')
    case $a in
        *:*:*) echo "$a" ;;
        *) echo "0000:$a" ;;
    esac
}

allowed() {
    for x in $PCI_BLOCKED; do
        [ "$(normalize "$x")" = "$1" ] && return 1
    done
    [ -z "$PCI_ALLOWED" ] && return 0
    for x in $PCI_ALLOWED; do
        [ "$(normalize "$x")" = "$1" ] && return 0
    done
    return 1
}

nvme_devices() {
    for d in "$SYSFS"/bus/pci/devices/*; do
        [ -e "$d/class" ] || continue
        [ "$(cat "$d/class")" = "$NVME_CLASS" ] && basename "$d"
    done
    return 0
}

driver_of() {
    l="$SYSFS/bus/pci/devices/$1/driver"
    if [ -L "$l" ]; then basename "$(readlink -f "$l")"; else echo "-"; fi
}

# Block devices (namespaces and partitions) of a controller bound to nvme.
block_devs() {
    for d in "$SYSFS"/bus/pci/devices/"$1"/nvme/nvme*/nvme*n*; do
        [ -e "$d" ] || continue
        basename "$d"
        for p in "$d"/nvme*n*p*; do
            if [ -e "$p" ]; then basename "$p"; fi
        done
    done
    return 0
}

# Why a device must not be taken from the kernel (mounted, swap, holders); empty if free.
active_uses() {
    uses=""
    for b in $(block_devs "$1"); do
        if grep -q "^/dev/$b " "$PROCFS/mounts" 2>/dev/null; then uses="$uses mount@$b"; fi
        if grep -q "^/dev/$b " "$PROCFS/swaps" 2>/dev/null; then uses="$uses swap@$b"; fi
        for h in "$SYSFS"/class/block/"$b"/holders/*; do
            if [ -e "$h" ]; then uses="$uses holder@$b:$(basename "$h")"; fi
        done
    done
    echo "${uses# }"
}

iommu_on() {
    [ -d "$SYSFS/kernel/iommu_groups" ] && [ -n "$(ls -A "$SYSFS/kernel/iommu_groups" 2>/dev/null)" ]
}

bind_driver() { # bdf driver ("" = the kernel's choice)
    dev="$SYSFS/bus/pci/devices/$1"
    echo "$2" > "$dev/driver_override"
    if [ -L "$dev/driver" ]; then
        echo "$1" > "$dev/driver/unbind"
    fi
    echo "$1" > "$SYSFS/bus/pci/drivers_probe" 2>/dev/null || true
}

hugepage_kb() { awk '/^Hugepagesize:/ {print $2}' "$PROCFS/meminfo"; }

reserve_hugepages() {
    kb=$(hugepage_kb)
    if [ -z "$kb" ]; then
        warn "this kernel has no hugepages; sluice falls back to ordinary pages"
        return 0
    fi
    pages=$(( (HUGEMEM * 1024 + kb - 1) / kb ))
    echo "$pages" > "$PROCFS/sys/vm/nr_hugepages"
    got=$(cat "$PROCFS/sys/vm/nr_hugepages")
    if [ "$got" -lt "$pages" ]; then
        warn "only $got of $pages hugepages of $kb kB could be reserved (memory fragmented?)"
    fi
    if [ "$PROCFS" = /proc ]; then
        mkdir -p /dev/hugepages
        if ! grep -q " /dev/hugepages hugetlbfs" /proc/mounts; then
            mount -t hugetlbfs nodev /dev/hugepages || warn "cannot mount hugetlbfs on /dev/hugepages"
        fi
    fi
    echo "hugepages: $got x $kb kB reserved"
}

load_vfio() {
    [ -d "$SYSFS/bus/pci/drivers/vfio-pci" ] && return 0
    if command -v modprobe >/dev/null 2>&1; then
        modprobe vfio-pci 2>/dev/null || true
        modprobe vfio_iommu_type1 2>/dev/null || true
    fi
    [ -d "$SYSFS/bus/pci/drivers/vfio-pci" ] || die "the vfio-pci driver is not loaded (modprobe vfio-pci)"
}

cmd_config() {
    case $HUGEMEM in
        ''|*[!0-9]*) die "HUGEMEM must be a number of MiB, not '$HUGEMEM'" ;;
    esac
    reserve_hugepages
    devs=$(nvme_devices)
    if [ -z "$devs" ]; then
        echo "no NVMe devices found"
        return 0
    fi
    iommu_on || die "no IOMMU: $SYSFS/kernel/iommu_groups is empty, so vfio-pci cannot be used. Enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (or amd_iommu=on)"
    load_vfio
    n=0
    refused=0
    for bdf in $devs; do
        if ! allowed "$bdf"; then
            echo "$bdf: skipped (PCI_ALLOWED/PCI_BLOCKED)"
            continue
        fi
        drv=$(driver_of "$bdf")
        if [ "$drv" = vfio-pci ]; then
            echo "$bdf: already bound to vfio-pci"
            n=$((n + 1))
            continue
        fi
        uses=$(active_uses "$bdf")
        if [ -n "$uses" ]; then
            echo "$bdf: in use ($uses), not binding it to vfio-pci" >&2
            refused=$((refused + 1))
            continue
        fi
        bind_driver "$bdf" vfio-pci
        drv=$(driver_of "$bdf")
        [ "$drv" = vfio-pci ] || die "$bdf: binding to vfio-pci failed (driver is now '$drv')"
        d="$SYSFS/bus/pci/devices/$bdf"
        group=$(basename "$(readlink -f "$d/iommu_group")")
        echo "$bdf ($(cat "$d/vendor"):$(cat "$d/device")): bound to vfio-pci (IOMMU group $group, /dev/vfio/$group)"
        n=$((n + 1))
    done
    echo "$n NVMe device(s) bound to vfio-pci"
    [ "$refused" -eq 0 ] || exit 2
}

cmd_status() {
    kb=$(hugepage_kb)
    total=$(awk '/^HugePages_Total:/ {print $2}' "$PROCFS/meminfo")
    free=$(awk '/^HugePages_Free:/ {print $2}' "$PROCFS/meminfo")
    echo "Hugepages: ${total:-0} total, ${free:-0} free, ${kb:-?} kB each"
    if iommu_on; then echo "IOMMU: on"; else echo "IOMMU: off (vfio-pci unusable)"; fi
    printf '%-14s %-11s %-5s %-10s %s\n' "BDF" "Vendor:Dev" "NUMA" "Driver" "Block devices"
    for bdf in $(nvme_devices); do
        d="$SYSFS/bus/pci/devices/$bdf"
        printf '%-14s %-11s %-5s %-10s %s\n' "$bdf" "$(cat "$d/vendor"):$(cat "$d/device")" \
            "$(cat "$d/numa_node" 2>/dev/null || echo -)" "$(driver_of "$bdf")" "$(block_devs "$bdf" | tr '\n' ' ')"
    done
}

cmd_reset() {
    n=0
    for bdf in $(nvme_devices); do
        allowed "$bdf" || continue
        drv=$(driver_of "$bdf")
        [ "$drv" = vfio-pci ] || [ "$drv" = "-" ] || continue
        bind_driver "$bdf" ""
        echo "$bdf: $drv -> $(driver_of "$bdf")"
        n=$((n + 1))
    done
    echo "$n NVMe device(s) given back to the kernel"
    if [ "$CLEAR_HUGE" = yes ]; then
        echo 0 > "$PROCFS/sys/vm/nr_hugepages"
        echo "hugepages released"
    fi
}

case "${1:-config}" in
    config) cmd_config ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
    help | -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (config, status, reset, help)" ;;
esac
