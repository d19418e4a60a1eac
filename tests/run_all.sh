#!/usr/bin/env bash
# `make test` after the main build: ctest on it, the sanitizer and fuzzer
# steps (`make sanitize fuzz`), and the Debian packages (`make deb`, then
# tests/package/package_test.sh).
#
# The integration tests spend most of their time waiting on guests, links and
# timeouts: two cores stay about two-thirds idle through ctest. The sanitizer
# and fuzzer trees (over eight minutes of compiling one after the other), and
# the packages, are therefore built beside ctest at nice 19, where they take
# only what the tests leave; their tests run once ctest is done, at normal
# priority: the package test (it installs the packages, runs a switch with
# them and purges them, under a minute) beside the sanitizer and fuzzer
# runs. A failure of any part fails the run, and each part's failures are
# shown at the end.
#
# Usage: run_all.sh BUILD IMAGE [FUZZ_SECONDS]
set -uo pipefail
build=$1
image=$2
fuzz_seconds=${3:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
make_cmd=${MAKE:-make}

mkdir -p "$build"
background_log=$build/sanitize-fuzz-build.log
# In a session of its own, so that a failed ctest can stop it, compilers and all.
setsid nice -n 19 "$make_cmd" -C "$root" --no-print-directory BUILD="$build" sanitize-build fuzz-build \
	>"$background_log" 2>&1 &
background=$!
deb_log=$build/deb-build.log
setsid nice -n 19 "$make_cmd" -C "$root" --no-print-directory BUILD="$build" deb >"$deb_log" 2>&1 &
deb_build=$!
stop_background() {
	kill -- "-$background" "-$deb_build" 2>/dev/null
	wait "$background" "$deb_build" 2>/dev/null
}
trap stop_background INT TERM

(cd "$build" && VMSYNC_IMAGE=$image ctest --output-on-failure -j 1 --timeout 900)
ctest_rc=$?
if [ "$ctest_rc" != 0 ]; then
	echo "ctest failed; stopping the sanitizer, fuzzer and package builds"
	stop_background
	"$root/tests/failure_digest.sh" "$build"
	exit 1
fi

echo "ctest passed; waiting for the sanitizer, fuzzer and package builds (logs: $background_log, $deb_log)"
wait "$background"
build_rc=$?
wait "$deb_build"
deb_rc=$?
trap - INT TERM
if [ "$deb_rc" != 0 ]; then
	echo "the package build (make deb) failed (exit $deb_rc); its last lines:"
	tail -n 40 "$deb_log"
	exit 1
fi
if [ "$build_rc" != 0 ]; then
	echo "the sanitizer or fuzzer build failed (exit $build_rc); its last lines:"
	tail -n 40 "$background_log"
	exit 1
fi
# The package test mostly waits (dpkg, a guest's boot, a switch) while the
# sanitizer and fuzzer runs use the CPU: they run side by side, the package
# test's output kept for the end.
package_log=$build/package-test.log
"$root/tests/package/package_test.sh" "$build/deb" "$image" >"$package_log" 2>&1 &
package_test=$!
"$make_cmd" -C "$root" --no-print-directory BUILD="$build" sanitize-run fuzz-run FUZZ_SECONDS="$fuzz_seconds"
runs_rc=$?
wait "$package_test"
package_rc=$?
cat "$package_log"
if [ "$package_rc" = 77 ]; then
	echo "the package test was skipped (see above)"
elif [ "$package_rc" != 0 ]; then
	echo "the package test failed (exit $package_rc; its output is above)"
	exit 1
fi
if [ "$runs_rc" != 0 ]; then
	echo "the sanitizer or fuzzer runs failed (exit $runs_rc; see above)"
	exit 1
fi
