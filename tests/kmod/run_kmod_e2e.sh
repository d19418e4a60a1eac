#!/bin/sh
# vmsync with the kmod page source, end to end, where vmsync.ko can load:
# Debian's kernel under QEMU TCG with nested SVM (tests/kmod/nested_kernel.sh),
# running a sync server and devices A and B on loopback. A runs the Linux
# guest (the counter workload: it appends to its disk and syncs every 100 ms,
# so QEMU's virtio-blk writes the request status and used ring into guest RAM
# all the time; with vmsync.read_disk it also reads 64 KiB of its disk with
# O_DIRECT each round, which QEMU writes into guest RAM) under QEMU -accel
# kvm with --page-source kmod; B follows as a
# standby with the same options. The guest has two vCPUs. Then switch to B
# and back to A.
#
# A runs with --final-full-compare: its final checkpoints (resumable points,
# the switch to B) compare every RAM unit, and the switch report says how
# many the module had not reported, which must be 0 (as must the daemons'
# "did not report" warnings over the whole run). B takes the module's list
# for the switch back, as the report must say. Both switches must complete
# (the target checks the final digest) and the counter go on after each, and
# the module must have found pages QEMU wrote beyond KVM's log. Exit 0 pass,
# 1 fail, 77 skip.
#
#   tests/kmod/run_kmod_e2e.sh BUILD_DIR [IMAGE_DIR]
# IMAGE_DIR defaults to $VMSYNC_IMAGE, then BUILD_DIR/vm-images/counter.
set -eu
SRC=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$(cd "${1:?usage: run_kmod_e2e.sh BUILD_DIR IMAGE_DIR}" && pwd)
IMAGE=${2:-${VMSYNC_IMAGE:-$BUILD/vm-images/counter}}
. "$SRC/tests/kmod/nested_kernel.sh"
[ -x "$BUILD/userspace/vmsync" ] || skip "no vmsync binary in $BUILD (make build)"
[ -f "$IMAGE/disk.img" ] || skip "no guest image in $IMAGE (make image)"
nk_prepare
nk_build_module

# vmsync and QEMU with their shared libraries (vmsync stripped: the
# initramfs lives in the nested kernel's memory), QEMU's firmware, the image.
copy_with_libs() {
	mkdir -p "$R/usr/bin"
	for lib in $(ldd "$1" | awk '/=>/ { print $3 } /^[ \t]*\/[^ ]*ld-linux/ { print $1 }'); do
		[ -f "$R$lib" ] && continue
		mkdir -p "$R$(dirname "$lib")"
		cp -L "$lib" "$R$lib"
	done
}
copy_with_libs "$BUILD/userspace/vmsync"
strip -o "$R/usr/bin/vmsync" "$BUILD/userspace/vmsync"
QEMU=$(command -v qemu-system-x86_64)
copy_with_libs "$QEMU"
cp "$QEMU" "$R/usr/bin/"
# Debian's QEMU looks for firmware in these (its --firmwarepath).
for d in /usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu; do
	[ -d "$d" ] || continue
	mkdir -p "$R$(dirname "$d")"
	cp -rL "$d" "$R$d"
done
mkdir -p "$R/image"
cp "$IMAGE"/* "$R/image/"
# Two vCPUs: KVM's log is the VM's, whichever vCPU wrote.
sed -i 's/}[[:space:]]*$/, "vcpus": 2}/' "$R/image/spec.json"
grep -q '"vcpus": 2' "$R/image/spec.json" || { echo "FAIL: cannot set vcpus in the image's spec.json"; exit 1; }
# The counter also reads its disk, 64 KiB with O_DIRECT each round
# (vm-images/workloads/counter.sh): QEMU's virtio-blk writes the data into
# guest RAM itself.
sed -i '1s/$/ vmsync.read_disk/' "$R/image/cmdline"
grep -q 'vmsync.read_disk' "$R/image/cmdline" || { echo "FAIL: cannot set vmsync.read_disk in the image's cmdline"; exit 1; }

cat >"$WORK/test.sh" <<'IN'
export PATH=/usr/bin:/bin
ip link set lo up
cd /tmp
w=/tmp/e2e; mkdir -p $w
server=127.0.0.1:7400
vmsync init --dir $w/id --server-name nested >/dev/null
for d in A B cli; do vmsync enroll --dir $w/id --user e2e --device $d --out $w/$d.cred >/dev/null; done
vmsync server --listen $server --data $w/server --tls $w/id >$w/server.log 2>&1 &
sleep 1
common="--server $server --accel kvm --page-source kmod --interval 1"
# B makes no resumable points: each costs the next harvest a rescan (QEMU
# turns its logging off when the VM runs again), and a switch whose final
# harvest fell on one would compare every unit instead of taking the list.
vmsync standby --device B --state $w/B --credential $w/B.cred $common --resumable-every 0 >$w/B.log 2>&1 &
vmsync active --device A --state $w/A --credential $w/A.cred --image /image $common --final-full-compare >$w/A.log 2>&1 &
apid=$!
counter() { tr -d '\r' <"$1" 2>/dev/null | grep -a '^vmsync-counter [0-9]*$' | tail -n 1 | cut -d' ' -f2; }
head_seq() { vmsync status --vm vm --server $server --credential $w/cli.cred --json 2>/dev/null | sed -n 's/.*"head_sequence": *\([0-9]*\).*/\1/p'; }
wait_head() {
	i=0
	while [ $i -lt 300 ]; do
		h=$(head_seq); [ -n "$h" ] && [ "$h" -ge "$1" ] && return 0
		sleep 1; i=$((i + 1))
	done
	echo "E2E: the chain did not reach checkpoint $1"
	return 1
}
i=0
while [ -z "$(counter $w/A/serial.log)" ] && [ $i -lt 400 ] && kill -0 $apid 2>/dev/null; do sleep 1; i=$((i + 1)); done
[ -n "$(counter $w/A/serial.log)" ] || { echo "E2E: the guest did not count on A"; tail -n 30 $w/A.log; }
echo "E2E_COUNTER_A $(counter $w/A/serial.log) after $i s"
smp=0
for p in /proc/[0-9]*; do
	tr '\0' ' ' <$p/cmdline 2>/dev/null | grep -q 'qemu-system-x86_64 .*-accel kvm .*-smp 2 ' && smp=$((smp + 1))
done
echo "E2E_QEMU_SMP2 $smp"
ok=1
wait_head $(( $(head_seq) + 4 )) || ok=0
if [ $ok = 1 ]; then
	vmsync switch --to B --server $server --credential $w/cli.cred --json >$w/switch1.json 2>&1 && echo E2E_SWITCH1_DONE
	cat $w/switch1.json
	sleep 5
	echo "E2E_COUNTER_B $(counter $w/B/serial.log)"
	wait_head $(( $(head_seq) + 4 )) || ok=0
fi
if [ $ok = 1 ]; then
	vmsync switch --to A --server $server --credential $w/cli.cred --json >$w/switch2.json 2>&1 && echo E2E_SWITCH2_DONE
	cat $w/switch2.json
	a_before=$(counter $w/A/serial.log)
	sleep 5
	echo "E2E_COUNTER_A_AGAIN $(counter $w/A/serial.log) (was $a_before)"
fi
for d in A B; do
	echo "== $d.log"
	grep -aE 'source|final scan|did not report|vmm|error|warn' $w/$d.log | tail -n 40
done
echo "E2E_DISK_READS_A $(grep -ac '^vmsync-read [0-9]' $w/A/serial.log)"
echo "E2E_DISK_READS_B $(grep -ac '^vmsync-read [0-9]' $w/B/serial.log)"
echo "E2E_KMOD_ACTIVE $(cat $w/A.log $w/B.log | grep -ac 'page source kmod')"
echo "E2E_FINAL_COMPLETE $(cat $w/A.log $w/B.log | grep -ac 'each reported by the kmod source')"
echo "E2E_FINAL_MISSED $(cat $w/A.log $w/B.log | grep -ac 'the kmod source did not report')"
echo "E2E_FINAL_LIST $(cat $w/A.log $w/B.log | grep -ac 'took the kmod source.s list')"
echo "E2E_RESCANS $(cat $w/A.log $w/B.log | grep -ac 'kmod source asks for a rescan')"
echo "E2E_QEMU_WRITES $(cat $w/A.log $w/B.log | sed -n 's/.*kmod: \([0-9]*\) pages written by the VMM.*/\1/p' | awk '{ s += $1 } END { print s + 0 }')"
kill $(jobs -p) 2>/dev/null
sleep 2
IN
NK_MEM=2048M
nk_boot "$WORK/test.sh" 480
grep -vE '^\[ *[0-9]+\.[0-9]+\]' "$NK_CONSOLE" | grep -E '^(E2E|==|\{|  )|source|final scan|warn|error' | tail -n 120
# What the guest said, and the checks on it.
value() { sed -n "s/^$1 \([0-9]*\).*/\1/p" "$NK_CONSOLE" | tail -n 1; }
json() { # the number or boolean of key $2 in the JSON report after marker $1
	sed -n "/^$1/,/^}/p" "$NK_CONSOLE" | sed -n "s/.*\"$2\": *\([a-z0-9]*\).*/\1/p" | head -n 1
}
fail=0
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }
check "switch A -> B done" 'nk_ok E2E_SWITCH1_DONE'
check "switch B -> A done" 'nk_ok E2E_SWITCH2_DONE'
check "the counter ran on B after the first switch" '[ -n "$(value E2E_COUNTER_B)" ]'
again=$(value E2E_COUNTER_A_AGAIN)
was=$(sed -n 's/^E2E_COUNTER_A_AGAIN [0-9]* (was \([0-9]*\)).*/\1/p' "$NK_CONSOLE")
check "the counter went on on A after the switch back ($was -> $again)" '[ -n "$again" ] && [ -n "$was" ] && [ "$again" -gt "$was" ]'
check "the guest read its disk on A and on B" '[ "$(value E2E_DISK_READS_A)" -gt 0 ] && [ "$(value E2E_DISK_READS_B)" -gt 0 ]'
check "both devices ran the VM with the kmod source" '[ "$(value E2E_KMOD_ACTIVE)" -ge 3 ]'
check "A's QEMU ran the guest under KVM with two vCPUs" '[ "$(value E2E_QEMU_SMP2)" -ge 1 ]'
check "A's switch compared every RAM unit" '[ "$(json E2E_SWITCH1_DONE final_ram_full_compare)" = true ]'
check "the module had missed none of them" '[ "$(json E2E_SWITCH1_DONE final_ram_missed)" = 0 ] && [ "$(json E2E_SWITCH1_DONE final_ram_units)" -gt 0 ]'
check "every full compare of the run found each changed unit reported" '[ "$(value E2E_FINAL_COMPLETE)" -ge 2 ] && [ "$(value E2E_FINAL_MISSED)" = 0 ]'
check "B's switch back took the module's list" '[ "$(json E2E_SWITCH2_DONE final_ram_full_compare)" = false ] && [ "$(value E2E_FINAL_LIST)" -ge 1 ]'
check "the module found pages QEMU wrote itself" '[ "$(value E2E_QEMU_WRITES)" -gt 0 ]'
check "no BUG, WARNING or Oops in the kernel log" '! nk_ok DMESG_BAD'
[ $fail = 0 ] && echo PASS && exit 0
echo FAIL; exit 1
