#!/bin/sh
# vmsync.ko in Debian's kernel under QEMU TCG (-cpu with SVM, so kvm-amd
# loads and runs a guest under nested KVM). Builds the module and a static
# test driver, boots the kernel with a busybox initramfs, loads kvm, kvm-amd
# and vmsync, checks that the module checked its view of KVM's structures
# against the kernel's BTF and that a build with a skewed struct kvm is
# refused, checks the version query, then runs kmod_invariant: a VMM
# process (tests/kvm_harness' minimal VMM) and a separate controller process
# that attaches through /dev/vmsync and checks every round that each page
# the guest wrote is reported; detach while the guest runs; SIGKILL of the
# VMM while attached; guest RAM that is anonymous or on hugetlbfs refused at
# attach, and on tmpfs with huge pages followed. Then kmod_qemu_check does
# the same against Debian's QEMU (-accel kvm, q35, shared RAM file) running
# qemu_guest_bios.S, and checks
# that bytes written through QEMU's own mapping of guest RAM are reported and
# that an attach while QEMU migrates is refused with the reason. When both
# pass, bench/kmod_harvest_bench runs briefly in the same boot and prints its
# table (harvest cost per round, kmod against scan): its timings decide
# nothing, but a benchmark that does not finish fails the test. Then dmesg
# must hold no BUG, WARNING or Oops, and the module must unload. Exit 0 pass,
# 1 fail, 77 skip.
#
# With --bench it runs only the benchmark, with its full count of rounds and
# a 512 MiB guest.
set -eu
MODE=test
[ "${1:-}" = --bench ] && MODE=bench
SRC=$(cd "$(dirname "$0")/../.." && pwd)
# Finding the kernel, skip (77, or a failure under VMSYNC_REQUIRE_ALL=1), the
# initramfs with kvm's modules, the boot and its console: shared with
# tests/kvm_harness/run_in_nested_kernel.sh.
. "$SRC/tests/kmod/nested_kernel.sh"
nk_prepare
# The builds run side by side (two cores), each failing on its own.
builds=
nk_build_module & builds="$builds $!"
gcc -static -O2 -Wall -o "$R/bin/version_probe" "$SRC/tests/kmod/version_probe.c" || { echo "FAIL: probe build"; exit 1; }
# The drivers are static (fmt header-only): the initramfs has no shared libraries.
build_driver() { # NAME SOURCE... [-lLIB]
	name=$1; shift
	$NK_CXX_STATIC -o "$R/bin/$name" "$@" >"$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log"; echo "FAIL: $name build"; exit 1; }
}
if [ $MODE = test ]; then
	# The layout check's counterpart: a module that believes struct kvm's
	# slots_lock lies 8 bytes further than it does (kmod/btf_check.c).
	nk_build_module skewed -DVMSYNC_TEST_LAYOUT_SKEW=8 & builds="$builds $!"
	build_driver kmod_invariant "$SRC/tests/kmod/kmod_invariant.cc" "$SRC/tests/kmod/vmm_process.cc" "$SRC/tests/kvm_harness/mini_vmm.cc" \
		"$SRC/userspace/harvest/kvm_ring_page_source.cc" "$SRC/userspace/harvest/kmod_page_source.cc" & builds="$builds $!"
	build_driver kmod_qemu_check "$SRC/tests/kmod/kmod_qemu_check.cc" "$SRC/userspace/harvest/kmod_page_source.cc" &
	builds="$builds $!"
	# Debian's QEMU with its shared libraries, and the tiny BIOS it runs.
	QEMU=$(command -v qemu-system-x86_64)
	mkdir -p "$R/usr/bin" "$R/qemu"
	cp "$QEMU" "$R/usr/bin/"
	for lib in $(ldd "$QEMU" | awk '/=>/ { print $3 } /^[ \t]*\/[^ ]*ld-linux/ { print $1 }'); do
		mkdir -p "$R$(dirname "$lib")"
		cp -L "$lib" "$R$lib"
	done
	# The option ROM QEMU loads for KVM's TPR patching (it runs without, with a warning).
	if [ -f /usr/share/qemu/kvmvapic.bin ]; then cp /usr/share/qemu/kvmvapic.bin "$R/qemu/"; fi
	as -o "$WORK/bios.o" "$SRC/tests/kmod/qemu_guest_bios.S" &&
		objcopy -O binary -j .text "$WORK/bios.o" "$R/qemu/bios.bin" || { echo "FAIL: BIOS build"; exit 1; }
fi
build_driver kmod_harvest_bench "$SRC/bench/kmod_harvest_bench.cc" "$SRC/tests/kvm_harness/mini_vmm.cc" \
	"$SRC/userspace/harvest/kvm_ring_page_source.cc" "$SRC/userspace/harvest/kmod_page_source.cc" -lxxhash &
builds="$builds $!"
for b in $builds; do wait "$b" || { kill $builds 2>/dev/null; exit 1; }; done
echo $MODE >"$R/mode"
# The part of /init between loading the modules and the dmesg check (see nested_kernel.sh).
cat >"$WORK/test.sh" <<'IN'
/bin/version_probe
if [ "$(cat /mode)" = test ]; then
	# The module loaded at boot checked its view of KVM's structures against
	# this kernel's BTF; the skewed build must be refused, naming the member.
	said() { dmesg | sed -n "s/^\[[ 0-9.]*\] //; /$1/p" | tail -n 1; }
	line=$(said "are where this kernel's BTF puts them")
	[ -n "$line" ] && echo "LAYOUT_CHECKED_OK: $line"
	rmmod vmsync
	if insmod /skewed/vmsync.ko 2>/dev/null; then
		echo "FAIL: the module with a skewed struct kvm loaded"; rmmod vmsync
	else
		line=$(said "struct kvm member slots_lock is at byte")
		[ -n "$line" ] && echo "LAYOUT_REFUSED_OK: $line"
	fi
	insmod /mod/vmsync.ko && [ -c /dev/vmsync ] && echo RELOADED_OK
fi
if [ "$(cat /mode)" = bench ]; then
	timeout 900 /bin/kmod_harvest_bench --guest-mb 512
else
	# Guest RAM the module must refuse (hugetlbfs) or follow (tmpfs with huge pages).
	mkdir -p /hugetlbfs /thp
	echo 8 >/proc/sys/vm/nr_hugepages
	mount -t hugetlbfs none /hugetlbfs
	mount -t tmpfs -o huge=always none /thp
	timeout 150 /bin/kmod_invariant
	invariant=$?
	echo "kmod_invariant exit $invariant"
	# 3 GiB of RAM (a sparse file): q35 puts 2 GiB below 4 GiB and 1 GiB above.
	timeout 150 /bin/kmod_qemu_check /ram.img 3221225472 /tmp/qmp.sock -- /usr/bin/qemu-system-x86_64 -accel kvm \
		-machine q35,memory-backend=ram0 -m 3G \
		-object memory-backend-file,id=ram0,size=3G,mem-path=/ram.img,share=on \
		-nodefaults -display none -vga none -bios /qemu/bios.bin -L /qemu -serial none -monitor none \
		-qmp unix:/tmp/qmp.sock,server=on,wait=off
	qemu_check=$?
	echo "kmod_qemu_check exit $qemu_check"
	# A few rounds (about 10 s under TCG): enough to show the table, not to tune by.
	if [ $invariant = 0 ] && [ $qemu_check = 0 ]; then
		start=$(date +%s)
		timeout 90 /bin/kmod_harvest_bench --rounds 3
		echo "kmod_harvest_bench exit $? after $(($(date +%s) - start)) s"
	fi
fi
IN
# The benchmark's 512 MiB guest needs the memory, and its scans the time.
if [ $MODE = bench ]; then NK_MEM=1536M; nk_boot "$WORK/test.sh" 960; else nk_boot "$WORK/test.sh" 240; fi
nk_console_tail 40
ok() { nk_ok "$1"; }
if [ $MODE = bench ]; then
	ok KMOD_BENCH_DONE && ok RMMOD_OK && ! ok DMESG_BAD && exit 0
	echo FAIL; exit 1
fi
ok VMSYNC_DEV_OK && ok LAYOUT_CHECKED_OK && ok LAYOUT_REFUSED_OK && ok RELOADED_OK && ok VERSION_OK && ok KMOD_INVARIANT_OK && ok RUNNING_OK && ok DETACH_RUNNING_OK && ok KILL9_OK && ok SLOT_CHANGE_OK && ok REARM_PAUSED_OK && ok MANUAL_PROTECT_OK && ok RING_FULL_OK && ok CONTROLLER_KILL9_OK && ok ANONYMOUS_REFUSED_OK && ok HUGETLB_REFUSED_OK && ok THP_OK && ok SCRATCH_OK && ok MIGRATION_REFUSED_OK && ok QEMU_KMOD_OK && ok QEMU_WRITES_OK && ok QEMU_KILL9_OK &&
	ok KMOD_TEST_DONE && ok KMOD_BENCH_DONE && ok "kmod_harvest_bench exit 0" && ok RMMOD_OK && ! ok DMESG_BAD && ! ok 'FAIL' && { echo PASS; exit 0; }
echo FAIL; exit 1
