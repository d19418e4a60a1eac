#!/usr/bin/env bash
# make demo: a sync server and two devices on loopback; the guest's counter
# runs on A, moves to B, comes back to A, is parked by `vmsync stop` and
# resumed on B, and we show what happened.
set -euo pipefail

build=${1:-build}
image=${2:-build/vm-images/counter}
vmsync="$build/userspace/vmsync"
[ -x "$vmsync" ] || { echo "demo: $vmsync not built; run make build" >&2; exit 1; }
[ -f "$image/disk.img" ] || { echo "demo: no guest image in $image; run make image" >&2; exit 1; }

work=$(mktemp -d /tmp/vmsync-demo-XXXXXX)
port=$((20000 + RANDOM % 20000))
server="127.0.0.1:$port"
pids=()
cleanup() {
  # The server last: an active device parks its VM before it exits.
  for pid in $(printf '%s\n' "${pids[@]}" | tac); do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Whole counter lines only: a switch may cut a line in two between the logs.
# (the guest's tty ends lines with CR LF)
last_counter() { tr -d '\r' 2>/dev/null < "$1" | grep -a '^vmsync-counter [0-9]*$' | tail -n 1 | awk '{print $2}'; }
first_counter_after() { tail -c +"$(( $2 + 1 ))" "$1" | tr -d '\r' | grep -a '^vmsync-counter [0-9]*$' | head -n 1 | awk '{print $2}'; }
head_seq() { "$vmsync" status --vm vm --server "$server" --credential "$work/cli.cred" --json | sed -n 's/.*"head_sequence": \([0-9]*\).*/\1/p'; }
wait_head() { # wait until the chain reaches $1
  for _ in $(seq 1 300); do [ "$(head_seq)" -ge "$1" ] 2>/dev/null && return 0; sleep 0.2; done
  echo "demo: the chain did not reach checkpoint $1" >&2; exit 1
}

say "state in $work; server on $server"
say "a server identity, and a credential for each of the user's devices (TLS)"
"$vmsync" init --dir "$work/identity" --server-name demo-server
for device in A B cli; do
  "$vmsync" enroll --dir "$work/identity" --user demo --device "$device" --out "$work/$device.cred"
done
"$vmsync" server --listen "$server" --data "$work/server" --tls "$work/identity" >"$work/server.log" 2>&1 & pids+=($!)
sleep 0.5
"$vmsync" standby --device B --state "$work/B" --server "$server" --credential "$work/B.cred" \
  >"$work/B.log" 2>&1 & pids+=($!)
"$vmsync" active --device A --state "$work/A" --server "$server" --credential "$work/A.cred" --image "$image" --accel auto \
  >"$work/A.log" 2>&1 & pids+=($!)

say "device A boots the guest (counter workload); B follows as a standby"
for _ in $(seq 1 600); do [ -n "$(last_counter "$work/A/serial.log")" ] && break; sleep 0.2; done
[ -n "$(last_counter "$work/A/serial.log")" ] || { echo "demo: the guest did not start counting"; cat "$work/A.log"; exit 1; }
grep -a 'accel auto' "$work/A.log" || true
wait_head $(( $(head_seq) + 3 ))
"$vmsync" status --vm vm --server "$server" --credential "$work/cli.cred"

say "switch A -> B"
offset_b=0
"$vmsync" switch --to B --server "$server" --credential "$work/cli.cred"
sleep 2
echo "counter on A when it paused: $(last_counter "$work/A/serial.log")"
echo "first counter B printed after resuming: $(first_counter_after "$work/B/serial.log" "$offset_b")"

wait_head $(( $(head_seq) + 3 ))
say "switch B -> A"
offset_a=$(stat -c %s "$work/A/serial.log")
"$vmsync" switch --to A --server "$server" --credential "$work/cli.cred"
sleep 2
echo "counter on B when it paused: $(last_counter "$work/B/serial.log")"
echo "first counter A printed after resuming: $(first_counter_after "$work/A/serial.log" "$offset_a")"

wait_head $(( $(head_seq) + 3 ))
say "stop: A parks the VM (final checkpoint, lease given back) and its daemon exits"
"$vmsync" stop --server "$server" --credential "$work/cli.cred"
"$vmsync" status --vm vm --server "$server" --credential "$work/cli.cred"
echo "counter on A when it parked: $(last_counter "$work/A/serial.log")"

say "resume the parked VM on B"
offset_b=$(stat -c %s "$work/B/serial.log")
"$vmsync" switch --to B --server "$server" --credential "$work/cli.cred"
sleep 2
echo "first counter B printed after resuming: $(first_counter_after "$work/B/serial.log" "$offset_b")"

say "checkpoints"
grep -a 'checkpoint .* stored' "$work/A.log" "$work/B.log" | sed 's/^.*info //' | tail -n 12
echo "total checkpoints: $(head_seq)"
"$vmsync" status --server "$server" --credential "$work/cli.cred"
say "serial logs: $work/A/serial.log $work/B/serial.log (kept)"
