#!/usr/bin/env bash
# Runs every libFuzzer target for SECONDS seconds each, from the seed corpus.
#   tests/fuzz/run.sh BUILD_DIR SECONDS
set -euo pipefail
build=$1
seconds=${2:-60}
here=$(cd "$(dirname "$0")" && pwd)
for target in xor_diff chunk_decode checkpoint_apply server_push; do
  case "$target" in
    xor_diff) corpus=$here/corpus/xor_diff ;;
    chunk_decode) corpus=$here/corpus/chunk ;;
    checkpoint_apply) corpus=$here/corpus/checkpoint ;;
    server_push) corpus=$here/corpus/server_push ;;
  esac
  [ -d "$corpus" ] || { echo "fuzz: no seed corpus $corpus"; exit 1; }
  work=$(mktemp -d)
  echo "fuzz: $target for $seconds s"
  # New inputs go to a scratch corpus; the committed seeds stay as they are.
  status=0
  "$build/${target}_fuzzer" -max_total_time="$seconds" -print_final_stats=1 "$work" "$corpus" >"$work.log" 2>&1 ||
    status=$?
  grep -E '^(stat::number_of_executed_units|Done)|ERROR|SUMMARY' "$work.log" || true
  [ "$status" -eq 0 ] || tail -n 40 "$work.log"
  rm -f "$work.log"
  rm -rf "$work"
  [ "$status" -eq 0 ] || { echo "fuzz: $target failed (exit $status, see above)"; exit 1; }
done
echo "fuzz: every target ran $seconds s without a crash"
