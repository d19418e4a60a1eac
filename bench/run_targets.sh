#!/bin/sh
# The benchmarks behind the pipeline's speed targets (issue 8), run briefly,
# then their summary: each target next to what this run measured. Run by
# ctest (pipeline_bench_targets) so that `make test` shows the table; the
# timings decide nothing, but a benchmark that is missing or fails does.
# `make bench` runs every benchmark for longer and prints the same summary.
# Usage: run_targets.sh VMSYNC_BENCH VMSYNC_BENCH_SUMMARY
set -eu
bench=$1
summary=$2
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$bench" --benchmark_min_time=0.05 \
	--benchmark_filter='^BM_(ReadBaseline|ScanHashPerUnit/avx2:1|XorDiffEncode/pct:10/avx2:1|BuildCheckpoint512MiB/pct:5/|BuildCheckpointMessage512MiB/pct:5/diff:./scan:0|ApplyCheckpoint)' \
	--benchmark_out="$out" --benchmark_out_format=json
"$summary" "$out"
