#!/bin/sh
# disk: a database that writes the disk: batches of sqlite inserts, each row
# derived from its number so every run writes the same data.
# needs: sqlite3
# memory-mb: 256
# disk-mb: 256
db=/var/lib/vmsync/workload.db
rm -f "$db"
sqlite3 "$db" "create table t (id integer primary key, payload text);"
end=$(( $(cut -d. -f1 /proc/uptime) + ${VMSYNC_DURATION:-60} ))
batch=0
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
  batch=$((batch + 1))
  {
    echo "begin;"
    i=0
    while [ $i -lt 20 ]; do
      id=$((batch * 20 + i))
      echo "insert into t values ($id, printf('%0800d', $id * 7919));"
      i=$((i + 1))
    done
    echo "commit;"
  } | sqlite3 "$db"
  echo "vmsync-disk batch $batch"
  sleep 0.2
done
echo "vmsync-workload: done"
