#!/bin/sh
# The kvm_harness gtest suites (vmsync_kvm_ring_tests, vmsync_kmod_source_tests)
# on real KVM when this host has none: inside Debian's kernel under QEMU TCG
# with nested KVM (-cpu qemu64,+svm,+npt; see tests/kmod/nested_kernel.sh,
# shared with tests/kmod/run_kmod_test.sh), with kvm, kvm-amd and vmsync.ko
# loaded. Both suites are built here, static (libgtest.a, fmt header-only),
# and run in the guest under VMSYNC_REQUIRE_ALL=1. The test passes only when
# each printed "[  PASSED  ] N tests", no FAILED or SKIPPED line, and exited 0.
#
# Which of the two runs the suites (ctest's harvest.kvm_in_nested_kernel, or
# the direct harvest.<Suite>.<Test> tests on this host's /dev/kvm) is decided
# here, at run time, by whether this host's /dev/kvm opens read-write, the
# same test the direct tests make (tests/kvm_harness/kvm_test_env.h):
# - it opens: the direct tests run the suites here; this exits 77 (skipped),
#   also under VMSYNC_REQUIRE_ALL=1, since nothing is missing.
# - it does not: the direct tests skip naming this test, and this runs the
#   suites; a missing prerequisite is a skip (77), or a failure under
#   VMSYNC_REQUIRE_ALL=1.
# --always runs the nested kernel even on a host with KVM.
# Exit 0 pass, 1 fail, 77 skip.
set -eu
SRC=$(cd "$(dirname "$0")/../.." && pwd)
. "$SRC/tests/kmod/nested_kernel.sh"
if [ "${1:-}" != --always ] && nk_host_kvm_opens; then
	echo "SKIP: host has /dev/kvm: the harvest.* kvm tests run there directly"
	exit 77
fi
START=$(date +%s)
nk_prepare
LIBGTEST=$(g++ -print-file-name=libgtest.a)
LIBGTEST_MAIN=$(g++ -print-file-name=libgtest_main.a)
if [ ! -f "$LIBGTEST" ] || [ ! -f "$LIBGTEST_MAIN" ]; then skip "static gtest missing (libgtest-dev: libgtest.a, libgtest_main.a)"; fi
[ -f /usr/include/gtest/gtest.h ] || skip "gtest headers missing (libgtest-dev)"
# The module and the suites' objects build side by side (two cores).
builds=
nk_build_module & builds="$builds $!"

# The suites as CMake builds them, linked static. test_env.cc's paths to the
# vmsync binary and guest images are not used by these suites.
TESTS="vmsync_kvm_ring_tests vmsync_kmod_source_tests"
O=$WORK/obj; mkdir -p "$O"
for s in tests/kvm_harness/mini_vmm.cc userspace/harvest/kvm_ring_page_source.cc \
	userspace/harvest/kmod_page_source.cc tests/support/test_env.cc \
	tests/kvm_harness/kvm_ring_test.cc tests/kvm_harness/kmod_page_source_test.cc; do
	o=$(basename "$s" .cc)
	$NK_CXX_STATIC -I"$SRC/tests/support" -DVMSYNC_BINARY='"vmsync"' -DVMSYNC_IMAGES_DIR='"vm-images"' \
		-c -o "$O/$o.o" "$SRC/$s" >"$WORK/compile-$o.log" 2>&1 ||
		{ cat "$WORK/compile-$o.log"; echo "FAIL: compiling $s"; exit 1; } &
	builds="$builds $!"
done
for b in $builds; do wait "$b" || { kill $builds 2>/dev/null; exit 1; }; done
SUPPORT="$O/mini_vmm.o $O/kvm_ring_page_source.o $O/kmod_page_source.o $O/test_env.o"
for t in $TESTS; do
	case $t in
	vmsync_kvm_ring_tests) main=$O/kvm_ring_test.o;;
	vmsync_kmod_source_tests) main=$O/kmod_page_source_test.o;;
	esac
	$NK_CXX_STATIC -o "$R/bin/$t" "$main" $SUPPORT "$LIBGTEST_MAIN" "$LIBGTEST" >"$WORK/link.log" 2>&1 ||
		{ cat "$WORK/link.log"; echo "FAIL: linking $t"; exit 1; }
done
echo "built in $(($(date +%s) - START)) s; booting $(uname -m) Debian kernel $KVER under QEMU TCG"

# In the guest: each suite between GTEST_BEGIN and GTEST_END lines, the
# latter with its exit code (124 when the timeout stopped it).
{
	echo "export VMSYNC_REQUIRE_ALL=1"
	for t in $TESTS; do
		echo "echo GTEST_BEGIN $t"
		echo "timeout 100 /bin/$t --gtest_color=no 2>&1"
		echo "echo \"GTEST_END $t exit \$?\""
	done
} >"$WORK/test.sh"
# The whole ctest test has 290 s: the boot gets what the builds left, at least 60 s.
LEFT=$((270 - ($(date +%s) - START)))
[ $LEFT -ge 60 ] || LEFT=60
nk_boot "$WORK/test.sh" $LEFT

fail=0
nk_ok '^KVM_DEV_OK$' || { echo "FAIL: no /dev/kvm in the nested kernel (kvm-amd did not load)"; fail=1; }
nk_ok '^VMSYNC_DEV_OK$' || { echo "FAIL: vmsync.ko did not load in the nested kernel"; fail=1; }
for t in $TESTS; do
	sed -n "/^GTEST_BEGIN $t\$/,/^GTEST_END $t exit/p" "$NK_CONSOLE" | grep -vE '^\[ *[0-9]+\.[0-9]+\]' >"$WORK/$t.out"
	cat "$WORK/$t.out"
	if ! grep -q "^GTEST_END $t exit 0\$" "$WORK/$t.out"; then
		echo "FAIL: $t did not exit 0 in the nested kernel"; fail=1
	elif ! grep -qE '^\[  PASSED  \] [1-9][0-9]* tests?\.$' "$WORK/$t.out"; then
		echo "FAIL: $t printed no [  PASSED  ] line"; fail=1
	elif grep -qE '^\[ +(FAILED|SKIPPED) +\]' "$WORK/$t.out"; then
		echo "FAIL: $t has a FAILED or SKIPPED test"; fail=1
	fi
done
nk_ok '^DMESG_BAD$' && { echo "FAIL: dmesg in the nested kernel holds BUG, WARNING, Oops or a call trace"; fail=1; }
nk_ok '^RMMOD_OK$' || { echo "FAIL: vmsync.ko did not unload"; fail=1; }
if [ $fail = 0 ]; then
	echo "PASS: $TESTS in the nested kernel in $(($(date +%s) - START)) s"
	exit 0
fi
echo "--- guest console, last 60 lines without kernel messages:"
nk_console_tail 60
echo FAIL
exit 1
