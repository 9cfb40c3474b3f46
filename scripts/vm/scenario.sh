#!/bin/sh
# The NVMe scenario run inside the guest. Writes its verdict to /tmp/result
# ("PASS ..." or "FAIL ..."); init prints it as the SLUICE-VM-RESULT line.
set -u
fail() { echo "FAIL $*" > /tmp/result; echo "scenario: FAIL: $*"; exit 1; }
step() { echo "scenario: $*"; }

NVME=$(for d in /sys/bus/pci/devices/*; do [ "$(cat $d/class)" = 0x010802 ] && basename $d; done | head -1)
[ -n "$NVME" ] || fail "no NVMe controller in the guest"
OTHER=$(for d in /sys/bus/pci/devices/*; do [ "$(cat $d/class)" != 0x010802 ] && basename $d; done | head -1)
step "NVMe controller $NVME (driver $(basename $(readlink /sys/bus/pci/devices/$NVME/driver 2>/dev/null) 2>/dev/null)), other device $OTHER"

# setup.sh: hugepages and the vfio-pci binding, as a user would run it.
HUGEMEM=${HUGEMEM:-160} PCI_ALLOWED="$NVME" sh /scripts/setup.sh config || fail "setup.sh config"
sh /scripts/setup.sh status
DRV=$(basename "$(readlink /sys/bus/pci/devices/$NVME/driver)")
[ "$DRV" = vfio-pci ] || fail "setup.sh left $NVME on $DRV"
step "bound to vfio-pci: /dev/vfio/$(basename $(readlink /sys/bus/pci/devices/$NVME/iommu_group))"

# The driver's own checks (attach errors, identify, verified I/O on two queue
# pairs, non-data commands, past-the-end reads, reset and detach with I/O in flight).
/usr/bin/nvme_guest "$NVME" "$OTHER" > /tmp/guest.log 2>&1
rc=$?
cat /tmp/guest.log
[ $rc -eq 0 ] && grep -q "NVME-GUEST: PASS" /tmp/guest.log || fail "nvme_guest: $(grep NVME-GUEST /tmp/guest.log)"

# sluice perf -w verify on the namespace, two reactors (two queue pairs), the
# controller attached from an SPDK JSON config. IOPS under TCG are bound by the
# CPU emulation: recorded, not a performance figure.
cat > /tmp/nvme.json <<EOF2
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "$NVME"}}]}]}
EOF2
/usr/bin/sluice perf -c /tmp/nvme.json -T Nvme0n1 -w verify -q 32 -o 4096 -t ${PERF_TIME:-4} -m 0x3 > /tmp/perf.log 2>&1
rc=$?
cat /tmp/perf.log
[ $rc -eq 0 ] || fail "sluice perf -w verify on Nvme0n1 exited with $rc"
step "perf verify passed (IOPS inside TCG are bound by the emulation, not a performance figure)"

# A qcow2 image on the namespace: bdev_qcow2_create formats Nvme0n1 (metadata
# owned by reactor 0, I/O from both reactors), perf -w verify writes it and reads
# it back. perf exits without closing the image, a crash as far as the image can
# tell; the service reopens it below and the host checks it with qemu-img.
cat > /tmp/qcow2.json <<EOF2
{"subsystems": [{"subsystem": "bdev", "config": [
  {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "$NVME"}},
  {"method": "bdev_qcow2_create", "params": {"name": "Qn1", "base_bdev": "Nvme0n1", "size": 134217728}}]}]}
EOF2
/usr/bin/sluice perf -c /tmp/qcow2.json -T Qn1 -w verify -q 32 -o 4096 -t ${PERF_TIME:-4} -m 0x3 > /tmp/perf-qcow2.log 2>&1
rc=$?
cat /tmp/perf-qcow2.log
[ $rc -eq 0 ] || fail "sluice perf -w verify on a qcow2 image on Nvme0n1 exited with $rc"
step "perf verify on a qcow2 image on Nvme0n1 passed"

# The service: attach through the RPC, list, detach.
S=/usr/bin/sluice
SOCK=/var/tmp/sluice.sock
$S serve --runtime-dir /var/tmp > /tmp/serve.log 2>&1 &
SERVE=$!
i=0; while [ ! -S $SOCK ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -S $SOCK ] || { cat /tmp/serve.log; fail "sluice serve did not start"; }
$S rpc bdev_nvme_attach_controller name=Nvme0 trtype=PCIe traddr=$NVME || fail "rpc attach"
$S rpc bdev_nvme_get_controllers | grep -q '"enabled"' || fail "rpc get_controllers"
$S rpc bdev_get_bdevs name=Nvme0n1 | grep -q '"NVMe disk"' || fail "rpc bdev_get_bdevs"
if $S rpc bdev_nvme_attach_controller name=Nvme1 trtype=PCIe traddr=0000:00:1f.6 2>/tmp/err; then fail "attach to an absent device succeeded"; fi
step "rpc attach to an absent device: $(cat /tmp/err)"
# The image perf left on namespace 1: reopened after the unclean exit, closed cleanly.
$S rpc bdev_qcow2_open name=Qn1 base_bdev=Nvme0n1 || fail "rpc bdev_qcow2_open on Nvme0n1 after perf"
$S rpc query-block | grep -q '"device": "Qn1"' || fail "Qn1 missing from query-block"
$S rpc bdev_qcow2_delete name=Qn1 || fail "rpc bdev_qcow2_delete Qn1"
step "qcow2 image on Nvme0n1 reopened and closed"

# Live block copy of a file-backed qcow2 chain (made on the host by qemu-img and
# qemu-io) onto namespace 2: the device moves onto a new qcow2 overlay formatted
# on Nvme0n2 whose backing file is the chain, the stream copies the chain's data
# into it and drops the backing file. The host compares the result with the chain.
$S rpc bdev_qcow2_open name=vm0 filename=/data/top.qcow2 direct=false read_only=true || fail "rpc bdev_qcow2_open chain"
$S rpc query-block | grep -q '"backing_file_depth": 1' || fail "the chain does not show its backing file"
$S rpc blockdev-snapshot-sync device=vm0 snapshot-file=Nvme0n2 format=qcow2 || fail "rpc blockdev-snapshot-sync onto Nvme0n2"
$S rpc query-block | grep -q '"backing_file_depth": 2' || fail "after the snapshot the device is not on an overlay over the chain"
$S rpc --wait block-stream device=vm0 > /tmp/stream.log 2>&1 || { cat /tmp/stream.log; fail "rpc block-stream vm0"; }
grep -q BLOCK_JOB_COMPLETED /tmp/stream.log || { cat /tmp/stream.log; fail "no BLOCK_JOB_COMPLETED"; }
$S rpc query-block > /tmp/qb.json
grep -q '"backing_file_depth": 0' /tmp/qb.json || { cat /tmp/qb.json; fail "after the stream the copy still has a backing file"; }
[ "$($S rpc query-block-jobs | tr -d ' \n')" = "[]" ] || fail "a block job is left after the stream"
$S rpc bdev_qcow2_delete name=vm0 || fail "rpc bdev_qcow2_delete vm0"
step "live copy of the chain onto Nvme0n2 streamed: $(grep -o '"len": [0-9]*' /tmp/stream.log) bytes"

for extra in /scenario.d/*.sh; do
    [ -f "$extra" ] || continue
    step "running $extra"
    . "$extra" || fail "$extra"
done
$S rpc bdev_nvme_detach_controller name=Nvme0 || fail "rpc detach"
kill $SERVE; wait $SERVE 2>/dev/null

# Give the controller back to the kernel driver.
sh /scripts/setup.sh reset || fail "setup.sh reset"
sleep 1
DRV=$(basename "$(readlink /sys/bus/pci/devices/$NVME/driver 2>/dev/null)" 2>/dev/null)
[ "$DRV" = nvme ] || fail "after setup.sh reset the controller is on '$DRV', not nvme"
i=0; while ! ls /sys/bus/pci/devices/$NVME/nvme/nvme*/ 2>/dev/null | grep -q n1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
step "kernel nvme driver took the controller back: $(ls /sys/bus/pci/devices/$NVME/nvme/)"
echo "PASS nvme $NVME: $(grep -c '^nvme_guest:' /tmp/guest.log) driver checks, perf verify on 2 queue pairs, perf verify on qcow2 on Nvme0n1, live copy of a qcow2 chain onto Nvme0n2, rpc attach/detach, setup.sh bind and reset" > /tmp/result
