#!/bin/sh
# In the guest: an ext4 file system on the data disk (/dev/vda, served by
# sluice over vhost-user-blk or NBD), files written and rewritten with their
# SHA-256 sums kept in RAM, in a loop, until the host (which meanwhile runs a
# snapshot, a stream, a mirror with pivot and an active commit with pivot
# under the disk) writes "stop" on the second serial port. Then: sync, every
# file checked against its sum, umount, `fsck.ext4 -n -f`, no I/O error in the
# kernel log; the whole disk's SHA-256 is printed for the host to compare with
# the final image. The result goes to /tmp/result.
set -u
fail() { echo "FAIL $*" > /tmp/result; echo "guest: FAIL $*"; exit 1; }
say() { echo "guest: $*"; }

[ -b /dev/vda ] || fail "no /dev/vda (virtio-blk did not come up)"
say "disk: $(cat /sys/block/vda/size) sectors, queues: $(ls /sys/block/vda/mq | wc -l)"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
cat /dev/ttyS1 > /tmp/host &
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda || fail "mkfs.ext4"
mount -t ext4 /dev/vda /mnt || fail "mount"
mkdir -p /tmp/sums
n=0
round=0
start=$(date +%s)
while ! grep -q stop /tmp/host 2>/dev/null; do
    round=$((round + 1))
    for i in 0 1 2 3 4 5 6 7; do
        f=/mnt/d$((i % 3))/f$i
        mkdir -p "$(dirname $f)"
        # Sizes vary; a rewrite may shrink a file (truncate) or rewrite part of it.
        kb=$(( ($(od -An -N2 -tu2 /dev/urandom) % 512) + 4 ))
        if [ $((round % 3)) = 2 ] && [ -f $f ]; then
            dd if=/dev/urandom of=$f bs=1k count=$((kb / 2)) seek=$((kb / 4)) conv=notrunc 2>/dev/null || fail "rewrite $f"
        else
            dd if=/dev/urandom of=$f bs=1k count=$kb 2>/dev/null || fail "write $f"
        fi
        sha256sum $f > /tmp/sums/f$i || fail "sum $f"
        n=$((n + 1))
    done
    [ $((round % 4)) = 0 ] && sync
    say "round $round ($n file writes)"
    if [ $(( $(date +%s) - start )) -gt ${GUEST_MAX_S:-1500} ]; then
        fail "the host never said stop"
    fi
done
say "host said stop after $round rounds ($n file writes)"
sync
for s in /tmp/sums/*; do
    sha256sum -c "$s" > /dev/null 2>&1 || fail "checksum of $(cut -d' ' -f3 $s) differs"
done
say "all $(ls /tmp/sums | wc -l) files match their sums"
umount /mnt || fail "umount"
fsck.ext4 -n -f /dev/vda > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "fsck.ext4 -n found problems"; }
say "fsck.ext4 -n -f: clean"
if dmesg | grep -i -E 'I/O error|EXT4-fs error|blk_update_request|Buffer I/O|critical (medium|target)'; then
    fail "I/O errors in the kernel log"
fi
sum=$(sha256sum /dev/vda | cut -d' ' -f1)
echo "SLUICE-VM-DISK-SHA256: $sum"
echo "PASS $round rounds, $n file writes verified, fsck clean, no I/O errors" > /tmp/result
