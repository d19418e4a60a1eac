# Sourced (POSIX sh, under set -eu) by tests/kmod/run_kmod_test.sh and
# tests/kvm_harness/run_in_nested_kernel.sh: Debian's kernel booted by QEMU
# TCG with a CPU that has SVM and nested paging (-cpu qemu64,+svm,+npt), so
# kvm-amd loads inside it and runs guests under nested KVM. That is real KVM
# on a host that has none, or whose KVM the tests must not depend on.
#
# The caller sets SRC (the repository root), then:
#   nk_prepare           finds KVER, KDIR and the kernel, checks what the boot
#                        needs (a missing piece goes to skip), makes WORK
#                        (removed on exit) and the initramfs tree R: static
#                        busybox and kvm's modules (irqbypass, ccp, kvm, kvm-amd)
#   nk_build_module [DIR [KCFLAGS]]
#                        builds vmsync.ko against KDIR, in a copy of the module
#                        sources under WORK (so that two runs at once do not
#                        share build files), and puts it in R/DIR (default
#                        mod, which /init loads from)
#   $NK_CXX_STATIC ...   compiles a static C++ driver (fmt header-only; the
#                        initramfs has no shared libraries)
#   nk_boot SCRIPT SECS  boots the kernel for at most SECS seconds (NK_MEM of
#                        memory, 768M if unset); its /init
#                        mounts proc, sysfs, devtmpfs (/dev/kvm appears once
#                        kvm-amd loads) and a tmpfs on /tmp, loads the modules
#                        in R/mod, prints KVM_DEV_OK (and for vmsync.ko its
#                        version and VMSYNC_DEV_OK), runs SCRIPT (busybox sh),
#                        prints DMESG_BAD if dmesg holds BUG, WARNING, Oops or
#                        a call trace, unloads vmsync.ko (RMMOD_OK) and powers
#                        off. The console, carriage returns removed, is in
#                        NK_CONSOLE.
#   nk_ok PATTERN        true when the console holds PATTERN (grep -E)
#   nk_console_tail N    the console's last N lines without kernel messages
#   nk_host_kvm_opens    true when this host's /dev/kvm opens read-write

# A missing prerequisite skips (exit 77), unless VMSYNC_REQUIRE_ALL=1 makes it a failure.
skip() {
	if [ "${VMSYNC_REQUIRE_ALL:-}" = 1 ]; then echo "FAIL (required): $*"; exit 1; fi
	echo "SKIP: $*"; exit 77
}

# The same test as the C++ side's open("/dev/kvm", O_RDWR). The shell's <>
# would create a missing file, hence the character-device test first.
nk_host_kvm_opens() {
	[ -c /dev/kvm ] && (exec 3<>/dev/kvm) 2>/dev/null
}

nk_prepare() {
	# The newest Debian kernel installed with its headers (linux-image-amd64 + linux-headers-amd64).
	if [ -z "${KVER:-}" ]; then
		KVER=$(ls -1 /usr/src 2>/dev/null | sed -n 's/^linux-headers-\(.*-amd64\)$/\1/p' | sort -V | tail -n 1)
	fi
	KDIR=${KDIR:-/usr/src/linux-headers-$KVER}
	[ -d "$KDIR" ] || skip "no kernel headers at $KDIR"
	[ -f "/boot/vmlinuz-$KVER" ] || skip "no /boot/vmlinuz-$KVER"
	[ -d "/lib/modules/$KVER" ] || skip "no /lib/modules/$KVER"
	command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 missing"
	BB=$(command -v busybox) || skip "busybox missing"
	ldd "$BB" >/dev/null 2>&1 && skip "busybox is not static (install busybox-static)"
	command -v cpio >/dev/null || skip "cpio missing"
	command -v g++ >/dev/null || skip "g++ missing"
	[ -f /usr/include/fmt/format-inl.h ] || skip "fmt headers missing (libfmt-dev)"

	WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
	R=$WORK/root; mkdir -p "$R/bin" "$R/mod" "$R/proc" "$R/sys" "$R/dev" "$R/tmp"
	cp "$BB" "$R/bin/busybox"
	for m in kernel/virt/lib/irqbypass.ko kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/arch/x86/kvm/kvm-amd.ko; do
		f=$(ls /lib/modules/$KVER/$m* 2>/dev/null | head -1) || true
		[ -n "$f" ] || continue
		case $f in *.xz) xz -dc "$f" >"$R/mod/$(basename "$m")";; *) cp "$f" "$R/mod/";; esac
	done
	NK_CXX_STATIC="g++ -std=c++20 -static -O2 -Wall -pthread -DFMT_HEADER_ONLY -I$SRC -I$SRC/userspace -I$SRC/tests/kvm_harness"
}

nk_build_module() {
	# The sources only: build files of an earlier in-tree build stay behind.
	# $1: where in R the module goes (default mod, which /init loads from);
	# $2: extra compiler flags (KCFLAGS).
	dest=${1:-mod}
	mkdir -p "$WORK/ko-$dest" "$R/$dest"
	(cd "$SRC" && find Kbuild kmod -type f \( -name Kbuild -o -name '*.[ch]' \) | cpio -pdm --quiet "$WORK/ko-$dest")
	make -s -C "$KDIR" M="$WORK/ko-$dest" KCFLAGS="${2:-}" modules >"$WORK/build-$dest.log" 2>&1 ||
		{ cat "$WORK/build-$dest.log"; echo "FAIL: module build ($dest)"; exit 1; }
	cp "$WORK/ko-$dest/vmsync.ko" "$R/$dest/"
}

nk_boot() {
	cp "$1" "$R/test.sh"
	cat >"$R/init" <<'IN'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc p /proc; mount -t sysfs s /sys; mount -t devtmpfs d /dev; mount -t tmpfs t /tmp
for m in irqbypass ccp kvm kvm-amd vmsync; do [ -f /mod/$m.ko ] && insmod /mod/$m.ko; done
echo "kernel: $(uname -r)"
[ -c /dev/kvm ] && echo KVM_DEV_OK
if [ -d /sys/module/vmsync ]; then
	echo "vmsync.ko version $(cat /sys/module/vmsync/version) srcversion $(cat /sys/module/vmsync/srcversion)"
	[ -c /dev/vmsync ] && echo VMSYNC_DEV_OK
fi
. /test.sh
dmesg | grep -E 'BUG|WARNING|Oops|Call Trace' && echo DMESG_BAD
[ -d /sys/module/vmsync ] && rmmod vmsync && echo RMMOD_OK
poweroff -f
IN
	chmod +x "$R/init"
	(cd "$R" && find . | cpio -o -H newc 2>/dev/null | gzip) >"$WORK/initrd.gz"
	timeout "$2" qemu-system-x86_64 -accel tcg -cpu qemu64,+svm,+npt -m "${NK_MEM:-768M}" \
		-kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.gz" \
		-append "console=ttyS0 panic=-1 quiet" -nographic -no-reboot \
		>"$WORK/console.raw" 2>&1 || true
	NK_CONSOLE=$WORK/console.log
	tr -d '\r' <"$WORK/console.raw" >"$NK_CONSOLE"
}

nk_ok() { grep -qE "$1" "$NK_CONSOLE"; }

nk_console_tail() { grep -vE '^\[ *[0-9]+\.[0-9]+\]' "$NK_CONSOLE" | tail -n "$1"; }
