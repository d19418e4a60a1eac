#!/usr/bin/env bash
# The example settings file the vmsync package installs as
# /etc/vmsync/vmsync.toml (packaging/vmsync.toml): every line a comment,
# since every vmsync command on the machine reads it, and every key it shows
# one that vmsync takes, so that uncommenting them gives a file vmsync reads.
#
# Usage: example_config_test.sh VMSYNC_BINARY SOURCE_ROOT
set -uo pipefail
vmsync=$1
example=$2/packaging/vmsync.toml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

[ -f "$example" ] || fail "no $example"
if grep -n -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$example"; then
	fail "$example sets the lines above; it must only show settings, commented out"
fi
"$vmsync" --config "$example" completion bash >/dev/null 2>"$work/err" ||
	fail "vmsync does not read $example as it is: $(cat "$work/err")"

# Uncommented: the "# key = value" lines and the "# [section]" lines.
sed -e 's/^# \([a-z][a-z-]* = \)/\1/' -e 's/^# \(\[[a-z.]*\]\)/\1/' "$example" >"$work/uncommented.toml"
keys=$(grep -c '^[a-z][a-z-]* = ' "$work/uncommented.toml")
sections=$(grep -c '^\[' "$work/uncommented.toml")
[ "$keys" -ge 5 ] && [ "$sections" -ge 1 ] ||
	fail "found only $keys keys and $sections sections to uncomment in $example"
"$vmsync" --config "$work/uncommented.toml" completion bash >/dev/null 2>"$work/err" ||
	fail "vmsync refuses $example uncommented ($keys keys): $(cat "$work/err")"

# The check above can fail: a key vmsync does not know is refused.
printf 'no-such-key = 1\n' >>"$work/uncommented.toml"
"$vmsync" --config "$work/uncommented.toml" completion bash >/dev/null 2>&1
[ $? = 2 ] || fail "vmsync took a config file with an unknown key"
echo "PASS: $example is all comments; its $keys keys and $sections section(s), uncommented, are read"
