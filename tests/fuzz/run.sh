#!/usr/bin/env bash
# Runs libFuzzer targets from their committed corpora (tests/fuzz/corpus/TARGET).
#
#   tests/fuzz/run.sh BUILD_DIR SECONDS [TARGET...]
#     Each target for SECONDS. New inputs go to a scratch folder: the
#     committed corpora are only read (this is what `make test` runs).
#   tests/fuzz/run.sh --grow BUILD_DIR SECONDS [TARGET...]
#     Each target for SECONDS with its committed corpus as the output corpus,
#     so it grows; then the corpus is minimized (-merge=1 into a fresh folder)
#     and the result replaces the committed one (`make fuzz-long`).
#
# Without TARGET, every target runs, one after the other (never two at once).
# Either way a table follows: executions, exec/s, corpus files before/after
# and the result. A crash leaves its input in BUILD_DIR/fuzz-artifacts/TARGET/.
set -euo pipefail

grow=0
if [ "${1:-}" = --grow ]; then grow=1; shift; fi
[ $# -ge 2 ] || { echo "usage: $0 [--grow] BUILD_DIR SECONDS [TARGET...]" >&2; exit 2; }
build=$1
seconds=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)

# Every target, with the largest input it is given: enough for a few small
# checkpoints or RPC messages, and it keeps each corpus small.
all_targets=(xor_diff chunk_decode checkpoint_apply server_push store_recovery replica_state rpc)
max_len() {
  case "$1" in
    xor_diff | chunk_decode) echo 8200 ;;
    replica_state) echo 4096 ;;
    *) echo 8192 ;;
  esac
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")
for target in "${targets[@]}"; do
  case " ${all_targets[*]} " in
    *" $target "*) ;;
    *) echo "fuzz: unknown target '$target' (the targets: ${all_targets[*]})" >&2; exit 2 ;;
  esac
  [ -d "$here/corpus/$target" ] && [ -n "$(ls -A "$here/corpus/$target")" ] ||
    { echo "fuzz: target $target has no corpus in $here/corpus/$target" >&2; exit 2; }
  [ -x "$build/${target}_fuzzer" ] || { echo "fuzz: $build/${target}_fuzzer is not built (make fuzz builds it)" >&2; exit 2; }
done

count() { find "$1" -maxdepth 1 -type f | wc -l; }
table=$(printf '%-17s %12s %8s %8s %8s  %s' target executions exec/s before after result)
failed=0
for target in "${targets[@]}"; do
  corpus=$here/corpus/$target
  fuzzer=$build/${target}_fuzzer
  artifacts=$build/fuzz-artifacts/$target/
  mkdir -p "$artifacts"
  work=$(mktemp -d)
  log=$work.log
  before=$(count "$corpus")
  echo "fuzz: $target for $seconds s$([ $grow = 1 ] && echo ', growing its corpus')"
  # Leaks are errors too; an input that runs 10 s is a hang; no input of a
  # few KiB has reason to allocate 1 GiB at once.
  flags=(-max_total_time="$seconds" -max_len="$(max_len "$target")" -timeout=10 -malloc_limit_mb=1024
         -print_final_stats=1 -artifact_prefix="$artifacts")
  if [ $grow = 1 ]; then dirs=("$corpus"); else dirs=("$work" "$corpus"); fi
  status=0
  "$fuzzer" "${flags[@]}" "${dirs[@]}" >"$log" 2>&1 || status=$?
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  grep -E '^(stat::number_of_executed_units|Done)|ERROR|SUMMARY' "$log" || true
  after=$before
  if [ "$status" -eq 0 ]; then
    result=ok
    if [ $grow = 1 ]; then
      # Minimize: only the inputs that add coverage, into a fresh folder.
      fresh=$work/merged
      mkdir "$fresh"
      if "$fuzzer" -merge=1 -max_len="$(max_len "$target")" -timeout=10 "$fresh" "$corpus" >"$work.merge" 2>&1 &&
         [ -n "$(ls -A "$fresh")" ]; then
        # Regression seeds (inputs that once crashed) stay, whatever they cover.
        find "$corpus" -maxdepth 1 -type f ! -name 'regression-*' -delete
        cp "$fresh"/* "$corpus"/
        for seed in "$corpus"/regression-*; do
          [ -e "$seed" ] || continue
          sum=$(sha1sum "$seed" | cut -d' ' -f1)
          rm -f "$corpus/$sum"
        done
        after=$(count "$corpus")
      else
        tail -n 20 "$work.merge"
        result="merge failed"
        failed=1
      fi
    fi
  else
    tail -n 40 "$log"
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    result="FAILED (exit $status${crash:+, input $crash})"
    failed=1
    [ $grow = 1 ] && after=$(count "$corpus")
  fi
  table+=$'\n'$(printf '%-17s %12s %8s %8s %8s  %s' "$target" "${executions:-?}" "${rate:-?}" "$before" "$after" "$result")
  rm -rf "$work" "$log" "$work.merge"
done
echo
echo "$table"
[ $grow = 0 ] || echo "corpus size: $(du -sh "$here/corpus" | cut -f1) ($here/corpus)"
[ $failed = 0 ] || { echo "fuzz: a target failed (see above)"; exit 1; }
echo "fuzz: every target ran $seconds s without a crash"
