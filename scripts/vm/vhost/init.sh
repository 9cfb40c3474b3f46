#!/bin/busybox sh
# PID 1 of the guest whose data disk sluice serves: mount the basics, load the
# virtio and ext4 modules, run the workload (guest.sh; bench.sh when the
# kernel command line says sluice_bench), print its result line
# and power off.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin:/sbin
mkdir -p /proc /sys /dev /tmp /mnt /etc
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/load.list); do
    insmod /lib/modules/$m.ko 2>/tmp/insmod.err || echo "init: insmod $m: $(cat /tmp/insmod.err)"
done
echo "init: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPU(s)"
script=/guest.sh
grep -q sluice_bench /proc/cmdline && script=/bench.sh
if sh $script > /dev/console 2>&1; then rc=0; else rc=$?; fi
if [ -s /tmp/result ]; then
    echo "SLUICE-VM-RESULT: $(cat /tmp/result)"
else
    echo "SLUICE-VM-RESULT: FAIL guest.sh exited with $rc without a result"
fi
sync
poweroff -f
