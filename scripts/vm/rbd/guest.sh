#!/bin/sh
# Issue #16 rapid deployment on NVMe, inside the guest (scripts/vm/init.sh runs
# it as /scenario.sh; scripts/vm/rbd/run.sh made the initramfs). Writes its
# verdict to /tmp/result ("PASS ..." or "FAIL ..."); init prints it as the
# SLUICE-VM-RESULT line.
#
# The network: QEMU's user networking (virtio-net), where the guest reaches the
# host's 127.0.0.1:PORT at 10.0.2.2:PORT. The cluster's monitor map and OSD map
# advertise 127.0.0.1, so a busybox nc forwarder per port (/etc/ceph/ports)
# carries the guest's 127.0.0.1:PORT to the host's. librbd reads
# /etc/ceph/ceph.conf and /etc/ceph/keyring.
#
# Then, on the NVMe controller through VFIO (setup.sh, as the NVMe scenario):
# blockdev-create formats a qcow2 overlay on each of namespaces 1..N whose
# backing file is the RBD snapshot ($BACKING, QEMU's rbd: name); each is
# opened as device vdI (its backing opened from the header, through librbd);
# `sluice perf -s -w verify` rounds write and verify [$PERF_OFF, +$PERF_LEN) of
# every device, round after round, from before the first stream starts until
# after the last one ends; N streams run at once; afterwards every device
# stands alone and is closed cleanly, and the host checks the namespaces.
set -u
fail() { echo "FAIL $*" > /tmp/result; echo "scenario: FAIL: $*"; exit 1; }
step() { echo "scenario: $*"; }
. /etc/rbd-scenario.env # N, BACKING, PERF_OFF, PERF_LEN, SIZE, STREAM_SPEED

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover \
         net_failover virtio_net; do
    insmod /lib/modules/$m.ko 2>/tmp/insmod.err || fail "insmod $m: $(cat /tmp/insmod.err)"
done
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ip link set lo up && ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 &&
    ip route add default via 10.0.2.2 || fail "network setup"
for p in $(cat /etc/ceph/ports); do
    nc -ll -p "$p" -e nc 10.0.2.2 "$p" &
done
MON=$(head -1 /etc/ceph/ports)
i=0
until banner=$(sleep 2 | timeout 5 nc 127.0.0.1 "$MON" | head -c 7) && [ "$banner" = "ceph v2" ]; do
    i=$((i+1)); [ $i -lt 20 ] || fail "the monitor at 10.0.2.2:$MON does not answer through the forwarder ('$banner')"
    sleep 0.5
done
step "monitor reached through 127.0.0.1:$MON -> 10.0.2.2:$MON ($(wc -w < /etc/ceph/ports) ports forwarded)"

NVME=$(for d in /sys/bus/pci/devices/*; do [ "$(cat $d/class)" = 0x010802 ] && basename $d; done | head -1)
[ -n "$NVME" ] || fail "no NVMe controller in the guest"
HUGEMEM=${HUGEMEM:-256} PCI_ALLOWED="$NVME" sh /scripts/setup.sh config >/tmp/setup.log 2>&1 ||
    { cat /tmp/setup.log; fail "setup.sh config"; }
DRV=$(basename "$(readlink /sys/bus/pci/devices/$NVME/driver)")
[ "$DRV" = vfio-pci ] || fail "setup.sh left $NVME on $DRV"
step "NVMe controller $NVME bound to vfio-pci"

S=/usr/bin/sluice
SOCK=/var/tmp/sluice.sock
$S serve --runtime-dir /var/tmp -m 0x3 > /tmp/serve.log 2>&1 &
SERVE=$!
i=0; while [ ! -S $SOCK ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -S $SOCK ] || { cat /tmp/serve.log; fail "sluice serve did not start"; }
rpc() { $S rpc -t 120 "$@"; }
rpc bdev_nvme_attach_controller name=Nvme0 trtype=PCIe traddr=$NVME >/dev/null || fail "rpc attach"
# What one client process costs here before its first byte (the gap between
# perf rounds below): a trivial call, timed.
time -f "%e" -o /tmp/rpc-time $S rpc query-block-jobs >/dev/null || fail "rpc query-block-jobs"
step "one sluice rpc call under TCG: $(cat /tmp/rpc-time) s"

# The overlays, formatted by blockdev-create jobs (QEMU's way) and opened with
# their backing from the header: librbd opens the snapshot N times.
i=1
while [ $i -le $N ]; do
    rpc blockdev-create job-id=c$i --params "{\"options\": {\"driver\": \"qcow2\", \"file\": \"Nvme0n$i\",
        \"size\": $SIZE, \"backing-file\": \"$BACKING\", \"backing-fmt\": \"raw\"}}" >/dev/null ||
        fail "blockdev-create on Nvme0n$i"
    i=$((i+1))
done
t=0
while rpc query-jobs | grep -q -E '"status": "(created|running|waiting|pending)"'; do
    t=$((t+1)); [ $t -lt 600 ] || fail "blockdev-create jobs did not conclude"; sleep 0.1
done
rpc query-jobs > /tmp/jobs.json
[ "$(grep -c '"status": "concluded"' /tmp/jobs.json)" = "$N" ] || { cat /tmp/jobs.json; fail "not every blockdev-create job concluded"; }
grep -q '"error"' /tmp/jobs.json && { cat /tmp/jobs.json; fail "a blockdev-create job failed"; }
i=1
while [ $i -le $N ]; do
    rpc job-dismiss id=c$i >/dev/null || fail "job-dismiss c$i"
    rpc bdev_qcow2_open name=vd$i node_name=ov$i base_bdev=Nvme0n$i >/dev/null ||
        { tail -20 /tmp/serve.log; fail "bdev_qcow2_open on Nvme0n$i (backing $BACKING)"; }
    i=$((i+1))
done
rpc query-block > /tmp/qb.json
[ "$(grep -c "\"backing_file\": \"$BACKING\"" /tmp/qb.json)" = "$N" ] || { cat /tmp/qb.json; fail "not every overlay is on the RBD snapshot"; }
step "$N qcow2 overlays on Nvme0n1..Nvme0n$N, backing $BACKING"

# The clients: perf verify rounds on every device, until the streams are done.
TARGETS=$(i=1; while [ $i -le $N ]; do printf -- '-T vd%s ' $i; i=$((i+1)); done)
rm -f /tmp/streams-done
(
    r=0
    while [ ! -e /tmp/streams-done ]; do
        r=$((r+1))
        t=$(date +%s)
        # shellcheck disable=SC2086
        $S perf -s $SOCK -w verify $TARGETS -q 2 -o 4096 -t $PERF_TIME \
            --offset $PERF_OFF --length $PERF_LEN -m 0x3 > /tmp/perf-$r.log 2>&1 ||
            { echo "round $r: exit $?" > /tmp/perf-failed; exit 1; }
        echo "$r $t $(date +%s)" >> /tmp/perf-rounds
    done
) &
CLIENTS=$!
t=0; while [ ! -s /tmp/perf-1.log ] && [ $t -lt 300 ]; do sleep 0.1; t=$((t+1)); done
grep -q "Running I/O" /tmp/perf-1.log || { cat /tmp/perf-1.log; fail "the first perf round did not start"; }
START=$(date +%s)
i=1
PIDS=""
while [ $i -le $N ]; do
    $S rpc --wait -t 600 block-stream device=vd$i job-id=s$i speed=$STREAM_SPEED > /tmp/stream-$i.log 2>&1 &
    PIDS="$PIDS $!"
    i=$((i+1))
done
i=1
for p in $PIDS; do
    wait $p || { cat /tmp/stream-$i.log; fail "block-stream vd$i"; }
    grep -q BLOCK_JOB_COMPLETED /tmp/stream-$i.log && ! grep -q '"error"' /tmp/stream-$i.log ||
        { cat /tmp/stream-$i.log; fail "stream s$i did not complete cleanly"; }
    i=$((i+1))
done
STREAMED=$(( $(date +%s) - START ))
[ -e /tmp/perf-failed ] && { cat /tmp/perf-*.log; fail "perf verify during the streams: $(cat /tmp/perf-failed)"; }
kill -0 $CLIENTS 2>/dev/null || fail "the perf rounds ended before the streams did"
touch /tmp/streams-done
wait $CLIENTS || { cat /tmp/perf-*.log; fail "perf verify: $(cat /tmp/perf-failed 2>/dev/null)"; }
ROUNDS=$(wc -l < /tmp/perf-rounds)
cat /tmp/perf-$ROUNDS.log
# Each round's seconds from the start of the process to its end (the rest is
# the gap between rounds: the client's start under TCG).
step "$N streams completed in ${STREAMED} s under $ROUNDS perf verify rounds of ${PERF_TIME} s on all $N devices (round lengths: $(awk '{printf "%s ", $3 - $2}' /tmp/perf-rounds)s)"

rpc query-block > /tmp/qb.json
[ "$(grep -c '"backing_file_depth": 0' /tmp/qb.json)" = "$N" ] || { cat /tmp/qb.json; fail "an overlay still has a backing file"; }
[ "$($S rpc query-block-jobs | tr -d ' \n')" = "[]" ] || fail "a block job is left after the streams"
i=1
while [ $i -le $N ]; do
    rpc bdev_qcow2_delete name=vd$i >/dev/null || fail "bdev_qcow2_delete vd$i"
    i=$((i+1))
done
rpc bdev_nvme_detach_controller name=Nvme0 >/dev/null || fail "rpc detach"
kill $SERVE; wait $SERVE 2>/dev/null
grep -q panicked /tmp/serve.log && { cat /tmp/serve.log; fail "sluice serve panicked"; }
echo "PASS $N qcow2 overlays on NVMe namespaces over RBD $BACKING streamed in ${STREAMED} s under $ROUNDS perf verify rounds of ${PERF_TIME} s, standalone and closed" > /tmp/result
