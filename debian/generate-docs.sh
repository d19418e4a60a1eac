#!/bin/sh
# The man pages and the bash completion, made from the programs just built:
# the pages with help2man from each command's --help, the completion with
# `vmsync completion bash`. debian/rules runs this after the build.
#
#   debian/generate-docs.sh BUILD_DIR OUT_DIR VERSION
#
# Writes OUT_DIR/man/*.1 and OUT_DIR/bash-completion/completions/vmsync.
set -eu
[ $# -eq 3 ] || { echo "usage: $0 BUILD_DIR OUT_DIR VERSION" >&2; exit 2; }
build=$1 out=$2 version=$3
for program in "$build/userspace/vmsync" "$build/server/vmsync-server"; do
	[ -x "$program" ] || { echo "generate-docs: $program was not built" >&2; exit 1; }
done
command -v help2man >/dev/null || { echo "generate-docs: help2man is not installed" >&2; exit 1; }

mkdir -p "$out/man" "$out/bash-completion/completions"
# The programs by name, as a user runs them: the usage lines name argv[0].
PATH=$(cd "$build/userspace" && pwd):$(cd "$build/server" && pwd):$PATH
export PATH
# The pages show the default settings file, not one named here.
unset VMSYNC_CONFIG
export NO_COLOR=1

# The commands of `vmsync`, one page each. vmsync-server(1) also stands for
# the vmsync-server program, which takes the options of `vmsync server`
# (without --config: it reads no settings file).
commands="active standby switch status stop server init enroll revoke completion study bench"
# NAME-line descriptions.
describe() {
	case $1 in
	vmsync) echo "keep a live virtual machine synchronized across devices" ;;
	active) echo "create or resume the VM on this device and run it" ;;
	standby) echo "keep this device's copy of the VM current, ready to take over" ;;
	switch) echo "move the running VM to another device" ;;
	status) echo "show the user's VMs, or one VM's devices" ;;
	stop) echo "park the VM: pause it, ship a final checkpoint, stop its daemon" ;;
	server) echo "run the vmsync sync server (as the vmsync-server program does)" ;;
	init) echo "create the sync server's identity (TLS)" ;;
	enroll) echo "issue a device's credential" ;;
	revoke) echo "revoke a device's credentials" ;;
	completion) echo "print a shell completion script" ;;
	study) echo "measure every checkpoint policy and interval on a workload" ;;
	bench) echo "benchmarks on a real guest and on the server" ;;
	esac
}

see_also=$(for c in $commands; do printf '.BR vmsync\\-%s (1),\n' "$c"; done)
see_also="$see_also
.BR vmsync\\-build\\-image (1)"

page() {  # NAME SECTION_DESCRIPTION OUTPUT COMMAND...
	name=$1 description=$2 output=$3
	shift 3
	# help2man would take the text of a failing --help for the help.
	$* --help >/dev/null 2>&1 || { echo "generate-docs: '$* --help' fails: $($* --help 2>&1 | head -n 3)" >&2; exit 1; }
	include=$out/man/$name.h2m
	{
		printf '[SEE ALSO]\n'
		if [ "$name" = vmsync ]; then printf '%s\n' "$see_also"; else printf '.BR vmsync (1)\n'; fi
		printf '\nThe files under /usr/share/doc/vmsync, docs/packaging.md among them.\n'
		printf '[FILES]\n.TP\n.I /etc/vmsync/vmsync.toml\n'
		printf 'Settings read by every command (unless --config FILE or $VMSYNC_CONFIG names another).\n'
	} >"$include"
	help2man --no-info --no-discard-stderr --version-string="$version" --section=1 \
		--source="vmsync $version" --manual="vmsync" --name="$description" \
		--include="$include" --output="$output" "$*"
	rm -f "$include"
	# A command's page is named as git names its commands': vmsync-standby(1),
	# for the title and for whatis, while its synopsis keeps `vmsync standby`.
	if [ $# -gt 1 ]; then
		upper=$(echo "$name" | tr 'a-z' 'A-Z')
		sed -i -e "s/^\.TH VMSYNC /.TH $upper /" -e "s/^$1 $2 \\\\-/$1\\\\-$2 \\\\-/" "$output"
	fi
}

page vmsync "$(describe vmsync)" "$out/man/vmsync.1" vmsync
for c in $commands; do
	page "vmsync-$c" "$(describe "$c")" "$out/man/vmsync-$c.1" vmsync "$c"
done

# The guest image builder, by the name the package gives it; its help is its
# header comment.
mkdir -p "$out/bin"
ln -sf "$(cd "$(dirname "$0")/.." && pwd)/vm-images/build.sh" "$out/bin/vmsync-build-image"
image_include=$out/man/image.h2m
printf '[SEE ALSO]\n.BR vmsync (1),\n.BR vmsync\\-active (1)\n' >"$image_include"
help2man --no-info --no-discard-stderr --version-string="$version" --section=1 \
	--source="vmsync $version" --manual="vmsync" --name="build a bootable guest image from Debian packages" \
	--include="$image_include" --output="$out/man/vmsync-build-image.1" \
	"$out/bin/vmsync-build-image"
rm -rf "$image_include" "$out/bin"

vmsync completion bash >"$out/bash-completion/completions/vmsync"
grep -q 'complete ' "$out/bash-completion/completions/vmsync" ||
	{ echo "generate-docs: \`vmsync completion bash\` printed no completion" >&2; exit 1; }
echo "generate-docs: $(ls "$out/man" | wc -l) man pages and the bash completion in $out"
