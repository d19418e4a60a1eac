#!/usr/bin/env bash
# After a failed ctest run: what each failed test said when it failed (the
# "Failure" lines of GoogleTest and the lines after them), so the reason is
# at the end of a long log and not only in its middle, where CI cuts it.
#   tests/failure_digest.sh BUILD_DIR
set -uo pipefail
build=${1:?usage: failure_digest.sh BUILD_DIR}
log=$build/Testing/Temporary/LastTest.log
failed=$build/Testing/Temporary/LastTestsFailed.log
[ -f "$failed" ] || { echo "failure digest: no $failed (did ctest run?)"; exit 0; }
echo
echo "=== why the failed tests failed (from $log) ==="
while IFS=: read -r _ name; do
  echo "--- $name"
  # GoogleTest's failure lines and the 3 after each; for a test that has
  # none (a script), the last 10 lines of its output.
  awk -v want="$name" '
    /^[0-9]+\/[0-9]+ Testing: / { current = substr($0, index($0, "Testing: ") + 9); after = 0; next }
    current != want { next }
    /^<end of output>/ { current = ""; next }
    { tail[n++ % 10] = substr($0, 1, 400) }
    /: Failure$/ || /^\[  FAILED  \]/ { after = 4 }
    after > 0 { print substr($0, 1, 400); after--; printed++ }
    END { if (!printed) for (i = (n > 10 ? n - 10 : 0); i < n; i++) print tail[i % 10] }
  ' "$log" | head -n 80
done < "$failed"
