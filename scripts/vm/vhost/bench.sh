#!/bin/sh
# In the guest, for scripts/bench/vhost.sh: 4 KiB random reads at QD 32 on the
# data disk (randread: native AIO, O_DIRECT), a warm-up, then the measured
# window the host samples the service's CPU counters around.
set -u
[ -b /dev/vda ] || { echo "FAIL no /dev/vda" > /tmp/result; exit 1; }
echo none > /sys/block/vda/queue/scheduler 2>/dev/null
args=$(sed -n 's/.*sluice_bench=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
# shellcheck disable=SC2086
if randread /dev/vda $args; then
    echo "PASS bench" > /tmp/result
else
    echo "FAIL randread" > /tmp/result
fi
