#!/bin/busybox sh
# PID 1 of the test guest: mount the basics, load the NVMe and VFIO modules,
# run the scenario, print its result line, power off.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mkdir -p /proc /sys /dev /tmp /dev/hugepages /var/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/tmp
for m in crc64 crc64-rocksoft crct10dif_common crc-t10dif t10-pi nvme-core nvme \
         vfio irqbypass vfio_virqfd vfio-pci-core vfio-pci vfio_iommu_type1; do
    insmod /lib/modules/$m.ko 2>/tmp/insmod.err || echo "init: insmod $m: $(cat /tmp/insmod.err)"
done
echo "init: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPU(s), $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"
if sh /scenario.sh > /tmp/scenario.log 2>&1; then rc=0; else rc=$?; fi
cat /tmp/scenario.log
if [ -s /tmp/result ]; then
    echo "SLUICE-VM-RESULT: $(cat /tmp/result)"
else
    echo "SLUICE-VM-RESULT: FAIL scenario exited with $rc without a result"
fi
sync
poweroff -f
