#!/bin/sh
# counter: a number kept in memory (a shell variable), printed on the serial
# console and appended to a file on the disk every 100 ms. After a live switch
# the count must go on from memory, never restart or reread the file.
mkdir -p /var/lib/vmsync
n=0
while :; do
  n=$((n + 1))
  echo "vmsync-counter $n"
  echo "$n" >> /var/lib/vmsync/counter.log
  sync
  sleep 0.1
done
