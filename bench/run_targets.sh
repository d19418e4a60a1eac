#!/bin/sh
# The benchmarks behind the pipeline's speed targets (issue 8), run briefly,
# then their summary: each target next to what this run measured. Run by
# ctest (bench.pipeline_targets) so that `make test` shows the table; the
# timings decide nothing, but a benchmark that is missing or fails does.
# `make bench` runs every benchmark for longer and prints the same summary.
#
# The standby's image writes are measured both ways (pwrite, io_uring) on the
# file system of the temporary directory and, as root with XFS and xfsprogs,
# again on XFS mounted from a loop device: there io_uring writes complete
# without a worker thread. Without XFS that half is left out, with the reason,
# and under VMSYNC_REQUIRE_ALL=1 the script fails. The benchmarks issue 8
# names that have no target (lz4, XOR-diff decode, the checkpoint at 1 and
# 20 %, the server's fan-out) follow, for comparison.
# Usage: run_targets.sh VMSYNC_BENCH VMSYNC_BENCH_SUMMARY VMSYNC_FANOUT_BENCH
set -eu
bench=$1
summary=$2
fanout=$3
work=$(mktemp -d)
cleanup() {
	# The loop device goes with the mount (mount -o loop sets autoclear).
	if mountpoint -q "$work/xfs" 2>/dev/null; then umount "$work/xfs"; fi
	rm -rf "$work"
}
trap cleanup EXIT
"$bench" --benchmark_min_time=0.05 \
	--benchmark_filter='^BM_(ReadBaseline|ScanHashPerUnit/avx2:1|XorDiffEncode/pct:10/avx2:1|BuildCheckpoint512MiB/pct:(1|5|20)/|BuildCheckpointMessage512MiB/pct:5/diff:./scan:0|ApplyCheckpoint|Lz4|XorDiffDecode)' \
	--benchmark_out="$work/bench.json" --benchmark_out_format=json
"$fanout" --benchmark_min_time=0.05 --benchmark_out="$work/fanout.json" --benchmark_out_format=json

# Mounts XFS on $work/xfs; sets $missing to why it cannot, if it cannot.
missing=
mount_xfs() {
	[ "$(id -u)" = 0 ] || { missing="mounting XFS takes root"; return; }
	grep -qw xfs /proc/filesystems || { missing="this kernel has no XFS"; return; }
	command -v mkfs.xfs >/dev/null || { missing="mkfs.xfs is missing (xfsprogs)"; return; }
	# Room for the benchmark's two 512 MiB images; the file stays sparse.
	truncate -s 2G "$work/xfs.img"
	mkfs.xfs -q -f "$work/xfs.img" >/dev/null 2>&1 || { missing="mkfs.xfs failed"; return; }
	mkdir "$work/xfs"
	mount -t xfs -o loop "$work/xfs.img" "$work/xfs" 2>/dev/null || missing="cannot mount XFS from a loop device"
}
mount_xfs
if [ -z "$missing" ]; then
	VMSYNC_BENCH_DIR="$work/xfs" "$bench" --benchmark_min_time=0.05 \
		--benchmark_filter='^BM_ApplyCheckpointWrites' \
		--benchmark_out="$work/xfs.json" --benchmark_out_format=json >/dev/null
	"$summary" "$work/bench.json" --xfs "$work/xfs.json" --fanout "$work/fanout.json"
else
	"$summary" "$work/bench.json" --fanout "$work/fanout.json"
	echo "image writes on XFS not measured: $missing"
	[ "${VMSYNC_REQUIRE_ALL:-0}" != 1 ] || exit 1
fi
