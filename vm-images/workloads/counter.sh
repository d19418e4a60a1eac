#!/bin/sh
# counter: a number kept in memory (a shell variable), printed on the serial
# console and appended to a file on the disk every 100 ms. After a live switch
# the count must go on from memory, never restart or reread the file.
#
# With vmsync.read_disk on the kernel command line, each round also reads
# 64 KiB of the disk with O_DIRECT, a different stretch each time: the
# device model (QEMU's virtio-blk) then writes guest RAM itself, into pages
# no vCPU writes, as a VM that reads its disk makes it do.
mkdir -p /var/lib/vmsync
read_disk=
grep -qw vmsync.read_disk /proc/cmdline && read_disk=1
disk_blocks=$(( $(cat /sys/block/vda/size 2>/dev/null || echo 0) / 128 ))
n=0
while :; do
  n=$((n + 1))
  echo "vmsync-counter $n"
  echo "$n" >> /var/lib/vmsync/counter.log
  sync
  if [ -n "$read_disk" ] && [ "$disk_blocks" -gt 0 ]; then
    dd if=/dev/vda of=/dev/null bs=64k count=1 skip=$((n % disk_blocks)) iflag=direct 2>/dev/null &&
      echo "vmsync-read $n"
  fi
  sleep 0.1
done
