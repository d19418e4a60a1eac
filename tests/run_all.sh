#!/usr/bin/env bash
# `make test` after the main build: ctest on it, and the sanitizer and fuzzer
# steps (`make sanitize fuzz`).
#
# The integration tests spend most of their time waiting on guests, links and
# timeouts: two cores stay about two-thirds idle through ctest. The sanitizer
# and fuzzer trees (over eight minutes of compiling one after the other) are
# therefore built beside ctest at nice 19, where they take only what the
# tests leave; their tests run once ctest is done, at normal priority. A
# failure of either part fails the run, and each part's failures are shown
# at the end.
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
stop_background() { kill -- "-$background" 2>/dev/null; wait "$background" 2>/dev/null; }
trap stop_background INT TERM

(cd "$build" && VMSYNC_IMAGE=$image ctest --output-on-failure -j 1 --timeout 900)
ctest_rc=$?
if [ "$ctest_rc" != 0 ]; then
	echo "ctest failed; stopping the sanitizer and fuzzer builds"
	stop_background
	"$root/tests/failure_digest.sh" "$build"
	exit 1
fi

echo "ctest passed; waiting for the sanitizer and fuzzer builds (log: $background_log)"
wait "$background"
build_rc=$?
trap - INT TERM
if [ "$build_rc" != 0 ]; then
	echo "the sanitizer or fuzzer build failed (exit $build_rc); its last lines:"
	tail -n 40 "$background_log"
	exit 1
fi
"$make_cmd" -C "$root" --no-print-directory BUILD="$build" sanitize-run fuzz-run FUZZ_SECONDS="$fuzz_seconds"
