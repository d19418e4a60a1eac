#!/usr/bin/env bash
# The Debian packages on this machine, run as their systemd units say.
#
# Installs vmsync and vmsync-dkms from DEB_DIR (apt-get, so that their
# dependencies resolve), checks what they installed (`vmsync --version` names
# this checkout's commit, the module built and installed by DKMS, man pages,
# completion, an example config that sets nothing), checks
# the units with `systemd-analyze verify`, then runs a sync server and two
# devices, A and B, with the command lines of the installed units'
# ExecStart=, each in the sandbox part that can be had without systemd: the
# unit's capability bounding set, no new privileges, its umask, a clean
# environment with its own config file (VMSYNC_CONFIG: two devices share this
# machine) and a notification socket (NOTIFY_SOCKET, WATCHDOG_USEC). Their
# state directories, /var/lib/vmsync/... in the units, are made as systemd
# makes StateDirectory= but under the test's own folder.
#
# The counter guest is created once with `vmsync active` on A and parked
# with `vmsync stop`, as docs/packaging.md tells a user to; the device units
# then follow it. `vmsync switch` resumes it on A, then moves it to B: the
# counter must go on from A's memory on B. SIGTERM then stops each daemon
# (the active one parks the VM) and everything is purged again.
#
# Usage: package_test.sh DEB_DIR IMAGE
# Exit 0 pass, 1 fail, 77 skip (a failure under VMSYNC_REQUIRE_ALL=1).
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: $0 DEB_DIR IMAGE" >&2; exit 2; }
debs=$1
image=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
vm=pkgtest
started=$(date +%s)

skip() {
	if [ "${VMSYNC_REQUIRE_ALL:-}" = 1 ]; then echo "FAIL (required): $*"; exit 1; fi
	echo "SKIP: $*"
	exit 77
}
fail() {
	echo "FAIL: $*"
	failed=1
	exit 1
}
step() { echo "[$(($(date +%s) - started)) s] $*"; }

# --- What the test needs; a missing piece skips.
[ "$(id -u)" = 0 ] || skip "not root: installing packages and running the device daemons need root"
for tool in apt-get dpkg-query systemd-analyze setpriv gcc qemu-system-x86_64 git man; do
	command -v "$tool" >/dev/null || skip "$tool is missing (make setup installs it)"
done
[ -f "$image/disk.img" ] || skip "no guest image in $image (make image)"
shopt -s nullglob
vmsync_debs=("$debs"/vmsync_*_amd64.deb)
dkms_debs=("$debs"/vmsync-dkms_*_all.deb)
shopt -u nullglob
[ ${#vmsync_debs[@]} = 1 ] && [ ${#dkms_debs[@]} = 1 ] ||
	fail "expected one vmsync_*_amd64.deb and one vmsync-dkms_*_all.deb in $debs (make deb), found: $(ls "$debs" 2>&1 | tr '\n' ' ')"

# A vmsync installed and set up here is someone's: not ours to purge.
if dpkg-query -W -f='${Status}\n' vmsync 2>/dev/null | grep -q ' installed$'; then
	extra=$(find /etc/vmsync -mindepth 1 ! -name vmsync.toml 2>/dev/null | head -n 3)
	conffile_sum=$(dpkg-query -W -f='${Conffiles}\n' vmsync | awk '$1 == "/etc/vmsync/vmsync.toml" { print $2 }')
	if [ -n "$extra" ] || { [ -f /etc/vmsync/vmsync.toml ] &&
		[ "$(md5sum </etc/vmsync/vmsync.toml | cut -d' ' -f1)" != "$conffile_sum" ]; }; then
		skip "vmsync is installed and configured on this machine (/etc/vmsync); the test would purge it"
	fi
	echo "note: vmsync is installed but not configured (left by an earlier run?); it is replaced and purged"
fi

work=$(mktemp -d /tmp/vmsync-package-XXXXXX)
chmod 0700 "$work"
declare -A pids=()
listeners=()
mounted_tracefs=""
failed=""
installed=""

stop_all() {
	for name in "${!pids[@]}"; do kill -TERM "${pids[$name]}" 2>/dev/null; done
	for name in "${!pids[@]}"; do
		for _ in $(seq 1 100); do kill -0 "${pids[$name]}" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "${pids[$name]}" 2>/dev/null
		wait "${pids[$name]}" 2>/dev/null
	done
	pids=()
	for pid in "${listeners[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
	listeners=()
}
purge() {
	DEBIAN_FRONTEND=noninteractive apt-get purge -y -q -o DPkg::Lock::Timeout=300 vmsync vmsync-dkms >"$work/purge.log" 2>&1
}
cleanup() {
	local rc=$?
	stop_all
	if [ -n "$installed" ]; then purge || { echo "cleanup: apt-get purge failed:"; tail -n 20 "$work/purge.log"; }; fi
	if [ -n "$mounted_tracefs" ]; then umount /sys/kernel/tracing 2>/dev/null; fi
	if [ -n "$failed" ] || [ "$rc" != 0 ]; then
		for log in "$work"/*.log; do
			echo "---- $(basename "$log") (last lines) ----"
			tail -n 25 "$log"
		done
		echo "logs kept in $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# --- Install.
step "installing $(basename "${vmsync_debs[0]}") and $(basename "${dkms_debs[0]}")"
installed=1
DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends --reinstall --allow-downgrades \
	"$(realpath "${vmsync_debs[0]}")" "$(realpath "${dkms_debs[0]}")" >"$work/install.log" 2>&1 ||
	fail "apt-get install failed (see install.log)"

cmake_version=$(sed -n 's/^project(vmsync VERSION \([0-9][0-9.]*\).*/\1/p' "$root/CMakeLists.txt")
commit=$(git -C "$root" rev-parse --short=12 HEAD) || fail "cannot read the checkout's commit"
git -C "$root" diff --quiet HEAD -- || commit="$commit-dirty"
expected="vmsync $cmake_version (commit $commit)"
got=$(/usr/bin/vmsync --version 2>&1)
[ "$got" = "$expected" ] || fail "/usr/bin/vmsync --version says '$got', expected '$expected'"
step "installed: $got"
/usr/bin/vmsync-server --help >/dev/null 2>&1 || fail "/usr/bin/vmsync-server --help fails"

# The module: DKMS built and installed it (for the running kernel and the
# newest, or for every kernel when the running one is not installed here, as
# on a build machine), where their headers are.
with_headers=0 built_for=0
for kernel_dir in /lib/modules/*; do
	kernel=$(basename "$kernel_dir")
	[ -e "$kernel_dir/build" ] || continue
	with_headers=$((with_headers + 1))
	dkms status -m vmsync -k "$kernel" | grep -q ': installed' || continue
	modinfo -k "$kernel" -F filename vmsync | grep -q '/updates/dkms/vmsync.ko' ||
		fail "DKMS says vmsync is installed for kernel $kernel, but modinfo -k $kernel does not find its vmsync.ko"
	built_for=$((built_for + 1))
done
if [ "$with_headers" = 0 ]; then
	# The switch below needs no module: the rest of the test goes on.
	[ "${VMSYNC_REQUIRE_ALL:-}" = 1 ] && fail "(required) no kernel with headers under /lib/modules: DKMS built no vmsync.ko"
	step "note: no kernel with headers under /lib/modules: DKMS built no vmsync.ko, not checked"
else
	[ "$built_for" -gt 0 ] ||
		fail "DKMS installed vmsync.ko for none of the $with_headers kernel(s) with headers: $(dkms status -m vmsync 2>&1)"
	step "vmsync.ko built and installed by DKMS for $built_for kernel(s)"
fi

for page in vmsync vmsync-standby vmsync-switch vmsync-server vmsync-build-image; do
	man -w "$page" >/dev/null 2>&1 || fail "no man page $page"
done
bash -c '. /usr/share/bash-completion/completions/vmsync && complete -p vmsync' >/dev/null 2>&1 ||
	fail "the bash completion does not define a completion for vmsync"
[ -f /etc/vmsync/vmsync.toml ] || fail "no /etc/vmsync/vmsync.toml"
if grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' /etc/vmsync/vmsync.toml; then
	fail "/etc/vmsync/vmsync.toml sets the lines above: it must only show settings, commented out"
fi
# The image builder finds its workloads beside itself, through /usr/bin's link.
out=$(/usr/bin/vmsync-build-image --out "$work/no-image" --workload no-such-workload 2>&1)
case $out in
*"one of:"*counter*) ;;
*) fail "vmsync-build-image did not list its workloads for an unknown one: $out" ;;
esac

# --- The units.
units=/lib/systemd/system
server_unit=$units/vmsync-server.service
device_unit=$units/vmsync-device@.service
[ -f "$server_unit" ] && [ -f "$device_unit" ] || fail "the units are not in $units"
verify=$(cd "$work" && systemd-analyze verify "$server_unit" "$device_unit" "vmsync-device@$vm.service" 2>&1)
[ $? = 0 ] && [ -z "$verify" ] || fail "systemd-analyze verify: $verify"
step "systemd-analyze verify: both units clean"

# --- Credentials, made with the installed commands.
/usr/bin/vmsync init --dir "$work/identity" --server-name localhost >"$work/init.log" 2>&1 ||
	fail "vmsync init failed: $(cat "$work/init.log")"
for device in A B cli; do
	/usr/bin/vmsync enroll --dir "$work/identity" --user tester --device "$device" --out "$work/$device.cred" \
		>>"$work/init.log" 2>&1 || fail "vmsync enroll $device failed: $(tail -n 3 "$work/init.log")"
done
port=""
for _ in $(seq 1 50); do
	candidate=$((20000 + RANDOM % 20000))
	if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then port=$candidate; break; fi
done
[ -n "$port" ] || fail "no free port found"
server="127.0.0.1:$port"
printf '[server]\nlisten = "%s"\ntls = "%s"\n' "$server" "$work/identity" >"$work/server.toml"
for device in A B; do
	printf 'server = "%s"\ncredential = "%s"\ndevice = "%s"\n' "$server" "$work/$device.cred" "$device" \
		>"$work/$device.toml"
done
printf 'server = "%s"\ncredential = "%s"\n' "$server" "$work/cli.cred" >"$work/cli.toml"
client() { VMSYNC_CONFIG="$work/cli.toml" /usr/bin/vmsync "$@"; }

# --- Starting a unit's command line as systemd would, but for the sandbox
# parts that need systemd itself (mount namespaces, device cgroup).
gcc -O2 -Wall -o "$work/notify_listener" "$root/tests/package/notify_listener.c" ||
	fail "cannot build the notification listener"
unit_value() { sed -n "s/^$2=//p" "$1" | tail -n 1; }
seconds() {  # a systemd time span in whole seconds (30, 30s, 2min)
	case $1 in
	*min) echo $((${1%min} * 60)) ;;
	*s) echo "${1%s}" ;;
	*[!0-9]*) fail "the test cannot read the time span '$1'" ;;
	*) echo "$1" ;;
	esac
}
# The watchdog: the daemons get WATCHDOG_USEC for 3 s, not the units'
# WatchdogSec= (30 s or more), so that a run this short sees their pings; a
# daemon pings at an interval it derives from WATCHDOG_USEC, as systemd
# expects of it.
test_watchdog=3
declare -A stop_timeout=() start_time=()
start_unit() {  # NAME UNIT_FILE INSTANCE CONFIG
	local name=$1 unit=$2 instance=$3 config=$4
	local state_root=$work/$name-state command caps bounding="-all" umask state_dir cap
	command=$(unit_value "$unit" ExecStart)
	command=${command//%i/$instance}
	case $command in *%* | *\"* | *\'* | *\\*)
		fail "$unit: the test runs plain ExecStart= lines with %i only, not: $command" ;;
	esac
	# The state directories under /var/lib/vmsync go to the test's folder.
	command=${command//\/var\/lib\/vmsync\//$state_root\/}
	state_dir=$(unit_value "$unit" StateDirectory)
	state_dir=${state_dir//%i/$instance}
	[ "${state_dir#vmsync/}" != "$state_dir" ] || fail "$unit: StateDirectory=$state_dir is not under vmsync/"
	mkdir -p "$state_root/${state_dir#vmsync/}"
	chmod "$(unit_value "$unit" StateDirectoryMode)" "$state_root/${state_dir#vmsync/}"
	caps=$(unit_value "$unit" CapabilityBoundingSet)
	for cap in $caps; do
		cap=${cap#CAP_}
		bounding="$bounding,+${cap,,}"
	done
	umask=$(unit_value "$unit" UMask)
	[ "$(unit_value "$unit" NoNewPrivileges)" = yes ] || fail "$unit: no NoNewPrivileges=yes"
	[ "$(unit_value "$unit" Type)" = notify ] || fail "$unit: Type= is not notify"
	stop_timeout[$name]=$(seconds "$(unit_value "$unit" TimeoutStopSec)")
	[ -n "${stop_timeout[$name]}" ] || fail "$unit: cannot read TimeoutStopSec="
	[ -n "$(unit_value "$unit" WatchdogSec)" ] || fail "$unit: no WatchdogSec="
	"$work/notify_listener" "$work/$name.notify.sock" "$work/$name.notify" &
	listeners+=($!)
	for _ in $(seq 1 50); do [ -S "$work/$name.notify.sock" ] && break; sleep 0.1; done
	local -a argv
	read -r -a argv <<<"$command"
	echo "$name: ${argv[*]} (capabilities: ${caps:-none}; umask $umask)" >"$work/$name.log"
	(
		cd / && umask "$umask" &&
			exec setpriv --no-new-privs --bounding-set "$bounding" --inh-caps -all -- \
				env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
				VMSYNC_CONFIG="$config" NOTIFY_SOCKET="$work/$name.notify.sock" \
				WATCHDOG_USEC="$((test_watchdog * 1000000))" "${argv[@]}"
	) >>"$work/$name.log" 2>&1 &
	pids[$name]=$!
	start_time[$name]=$(date +%s)
}
# Stops a unit's process as systemd does (SIGTERM, at most TimeoutStopSec),
# and checks that it exited 0.
stop_unit() {  # NAME
	local name=$1 pid=${pids[$1]} status
	kill -TERM "$pid" || fail "$name is not running"
	for _ in $(seq 1 $((stop_timeout[$name] * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	kill -0 "$pid" 2>/dev/null && fail "$name did not stop within TimeoutStopSec=${stop_timeout[$name]}s of SIGTERM"
	wait "$pid"
	status=$?
	unset "pids[$name]"
	[ "$status" = 0 ] || fail "$name exited with $status after SIGTERM"
}
wait_for() {  # SECONDS WHAT COMMAND...
	local limit=$1 what=$2
	shift 2
	for _ in $(seq 1 $((limit * 5))); do "$@" && return 0; sleep 0.2; done
	fail "$what (waited $limit s)"
}
running() { kill -0 "${pids[$1]}" 2>/dev/null || fail "$1 exited: $(tail -n 5 "$work/$1.log")"; }

# Whole counter lines of the guest's serial consoles, in order.
counters() { cat "$@" 2>/dev/null | tr -d '\r' | grep -a '^vmsync-counter [0-9]*$' | awk '{ print $2 }'; }
counts_more_than() { [ "$(counters "$2" | wc -l)" -gt "$1" ]; }
status_json() { client status --vm "$vm" --json 2>/dev/null | tr -d ' \n'; }
head_sequence() { status_json | sed -n 's/.*"head_sequence":\([0-9]*\).*/\1/p'; }
head_reaches() { local h; h=$(head_sequence); [ -n "$h" ] && [ "$h" -ge "$1" ]; }
# nlohmann::json writes keys in alphabetical order: active, applied_sequence,
# device, state.
online() { status_json | grep -q "\"device\":\"$1\",\"state\":\"online\""; }
both_online() { online A && online B; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

# What the daemons told systemd (Type=notify).
has_notified() { grep -q "$2" "$work/$1.notify" 2>/dev/null; }

# The bpf block source needs the kernel's BTF, and tracefs, which systemd
# mounts at boot.
bpf_missing=""
if ! mountpoint -q /sys/kernel/tracing; then
	if mount -t tracefs nodev /sys/kernel/tracing; then mounted_tracefs=1; else bpf_missing="tracefs does not mount"; fi
fi
[ -f /sys/kernel/btf/vmlinux ] || bpf_missing="the kernel has no BTF (/sys/kernel/btf/vmlinux)"
if [ -n "$bpf_missing" ]; then
	[ "${VMSYNC_REQUIRE_ALL:-}" = 1 ] && fail "(required) $bpf_missing: the bpf block source cannot run"
	step "note: $bpf_missing: the devices' bpf block source is not checked"
fi

# --- The server, as vmsync-server.service runs it.
start_unit server "$server_unit" "" "$work/server.toml"
wait_for 30 "the server listens on $server" listening
running server
step "server up on $server"

# --- The VM, made once on A and parked.
mkdir -p "$work/A-state/devices"
chmod 0700 "$work/A-state" "$work/A-state/devices"
VMSYNC_CONFIG="$work/A.toml" /usr/bin/vmsync active --vm "$vm" --image "$image" \
	--state "$work/A-state/devices/$vm" >"$work/A-create.log" 2>&1 &
pids[A-create]=$!
a_serial=$work/A-state/devices/$vm/serial.log
b_serial=$work/B-state/devices/$vm/serial.log
wait_for 120 "the guest counts on A" counts_more_than 5 "$a_serial"
wait_for 60 "the first checkpoints reach the server" head_reaches 3
client stop --vm "$vm" >"$work/stop.log" 2>&1 || fail "vmsync stop failed: $(cat "$work/stop.log")"
for _ in $(seq 1 300); do kill -0 "${pids[A-create]}" 2>/dev/null || break; sleep 0.2; done
kill -0 "${pids[A-create]}" 2>/dev/null && fail "vmsync active did not exit after vmsync stop"
wait "${pids[A-create]}" || fail "vmsync active exited with $? after parking"
unset "pids[A-create]"
step "VM $vm created on A and parked: $(cat "$work/stop.log")"

# --- The device units: both follow the VM.
start_unit A "$device_unit" "$vm" "$work/A.toml"
start_unit B "$device_unit" "$vm" "$work/B.toml"
wait_for 60 "A and B are online" both_online
running A
running B
for name in server A B; do
	wait_for 60 "$name sends READY=1" has_notified "$name" 'READY=1'
done
step "devices A and B online as standbys (READY=1 from the server and both devices)"

# --- Resume on A, then switch to B.
client switch --to A --vm "$vm" --json >"$work/switch-A.json" 2>"$work/switch-A.err" ||
	fail "vmsync switch --to A failed: $(cat "$work/switch-A.err")"
grep -q '"from_parked": true' "$work/switch-A.json" || fail "switch --to A did not resume the parked VM: $(cat "$work/switch-A.json")"
before=$(counters "$a_serial" | wc -l)
wait_for 60 "the guest counts on A again" counts_more_than $((before + 5)) "$a_serial"
head=$(head_sequence)
wait_for 60 "A's checkpoints reach the server" head_reaches $((head + 3))
client switch --to B --vm "$vm" --json >"$work/switch-B.json" 2>"$work/switch-B.err" ||
	fail "vmsync switch --to B failed: $(cat "$work/switch-B.err")"
grep -q '"from": "A"' "$work/switch-B.json" && grep -q '"to": "B"' "$work/switch-B.json" ||
	fail "the switch report does not say A -> B: $(cat "$work/switch-B.json")"
wait_for 60 "the guest counts on B" counts_more_than 5 "$b_serial"
running A
running B
step "switched A -> B: $(tr -d ' \n' <"$work/switch-B.json" | grep -o '"total_ms":[0-9.]*')"

# B resumed A's guest: no boot lines, and the count goes on from A's memory.
grep -aq 'vmsync-guest:' "$b_serial" && fail "B booted the guest instead of resuming it"
previous=""
while read -r value; do
	[ -z "$previous" ] || [ "$value" = $((previous + 1)) ] ||
		fail "the counter is not continuous across create, park, resume on A and switch to B: $value follows $previous"
	previous=$value
done < <(counters "$a_serial" "$b_serial")
step "the counter went on from A to B: last on A $(counters "$a_serial" | tail -n 1), first on B $(counters "$b_serial" | head -n 1)"

# With the units' two capabilities, the active daemons used the bpf block source.
if [ -z "$bpf_missing" ]; then
	for name in A B; do
		grep -q 'block source auto: bpf (' "$work/$name.log" ||
			fail "$name did not use the bpf block source with CAP_BPF and CAP_PERFMON: $(grep 'block source' "$work/$name.log")"
	done
fi

# --- systemctl stop: B (active) parks the VM, then A, then the server.
for name in B A server; do
	[ "$name" = A ] && { status_json | grep -q "\"parked\":true,\"parked_by\":\"B\"" ||
		fail "the server does not hold the VM as parked by B after B stopped: $(status_json)"; }
	lived=$(($(date +%s) - start_time[$name]))
	stop_unit "$name"
	has_notified "$name" 'STOPPING=1' || fail "$name did not send STOPPING=1 on SIGTERM"
	# systemd kills a service whose watchdog goes unfed for WatchdogSec.
	if [ "$lived" -gt $((2 * test_watchdog)) ]; then
		has_notified "$name" 'WATCHDOG=1' ||
			fail "$name ran $lived s without a WATCHDOG=1 (WATCHDOG_USEC: ${test_watchdog} s)"
	fi
done
step "B parked the VM on SIGTERM; every daemon exited 0"

# --- Purge: the machine as it was.
stop_all
purge || fail "apt-get purge failed: $(tail -n 20 "$work/purge.log")"
installed=""
dpkg-query -W -f='${Status}\n' vmsync 2>/dev/null | grep -q ' installed$' && fail "vmsync is still installed"
[ ! -e /usr/bin/vmsync ] || fail "/usr/bin/vmsync is still there after the purge"
[ -z "$(dkms status -m vmsync 2>/dev/null)" ] || fail "DKMS still holds vmsync: $(dkms status -m vmsync)"
step "PASS: packages installed, run as their units, switched, purged"
