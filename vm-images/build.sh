#!/usr/bin/env bash
# Builds a bootable guest from Debian packages only:
#   vmlinuz     Debian's kernel (linux-image-amd64)
#   initrd.img  busybox-static + the kernel modules needed to mount the root disk
#   disk.img    a raw ext4 root disk, made without mounting (mkfs.ext4 -d)
#   cmdline     the kernel command line
#   spec.json   workload, memory and disk sizes
# The workload runs at boot with its output on the serial console.
#
#   vm-images/build.sh --out DIR [--workload NAME|PATH] [--disk-mb N] [--memory-mb N]
#
# NAME is one of vm-images/workloads/*.sh; a PATH is your own script. A script
# may declare what it needs in comment lines:
#   # needs: ffmpeg sqlite3     host binaries copied in, with their libraries
#   # asset: video music        media made at build time (see make_asset)
#   # memory-mb: 512            guest RAM
#   # disk-mb: 512              root disk size
# The output is rebuilt only when the recipe (this script, the workload, the
# kernel, busybox, the sizes) changes.
set -euo pipefail

# The workloads lie beside the script, also when it runs through a link
# (the Debian package links it as /usr/bin/vmsync-build-image).
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
out=""
workload="counter"
disk_mb=""
memory_mb=""

die() { echo "vm-images: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --workload) workload=$2; shift 2 ;;
    --disk-mb) disk_mb=$2; shift 2 ;;
    --memory-mb) memory_mb=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$out" ] || die "--out DIR is required"

# The workload script: a built-in name or a user's file.
if [ -f "$workload" ]; then
  script=$(cd "$(dirname "$workload")" && pwd)/$(basename "$workload")
  name=$(basename "$workload" .sh)
elif [ -f "$here/workloads/$workload.sh" ]; then
  script="$here/workloads/$workload.sh"
  name=$workload
else
  die "no workload '$workload': give a script path or one of: $(cd "$here/workloads" && ls *.sh | sed 's/\.sh$//' | tr '\n' ' ')"
fi
declared() { sed -n "s/^# $1: *//p" "$script" | head -n 1; }
needs=$(declared needs)
assets=$(declared asset)
[ -n "$memory_mb" ] || memory_mb=$(declared memory-mb)
[ -n "$memory_mb" ] || memory_mb=128
[ -n "$disk_mb" ] || disk_mb=$(declared disk-mb)
[ -n "$disk_mb" ] || disk_mb=64

# Debian's kernel: the newest installed linux-image-*-amd64 with its modules.
kver=""
for dir in $(ls -1d /lib/modules/*-amd64 2>/dev/null | sort -V -r); do
  v=$(basename "$dir")
  if [ -f "/boot/vmlinuz-$v" ]; then kver=$v; break; fi
done
[ -n "$kver" ] || die "no Debian kernel found (/boot/vmlinuz-*-amd64 with /lib/modules): install linux-image-amd64"
[ -r "/boot/vmlinuz-$kver" ] || die "cannot read /boot/vmlinuz-$kver"
busybox=/bin/busybox
[ -x "$busybox" ] || die "busybox-static is not installed"
if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is linked dynamically: install busybox-static"; fi

recipe=$( {
  cat "$0" "$script"
  echo "kernel=$kver busybox=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null)"
  echo "memory=$memory_mb disk=$disk_mb needs=$needs assets=$assets"
  for b in $needs; do command -v "$b" >/dev/null && dpkg-query -S "$(readlink -f "$(command -v "$b")")" 2>/dev/null; done
} | sha256sum | cut -d' ' -f1)
if [ -f "$out/recipe.sha256" ] && [ "$(cat "$out/recipe.sha256")" = "$recipe" ] &&
   [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/disk.img" ]; then
  echo "vm-images: $out is up to date (workload $name, kernel $kver)"
  exit 0
fi

echo "vm-images: building $out (workload $name, kernel $kver, ${memory_mb} MiB RAM, ${disk_mb} MiB disk)"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$out"
rm -f "$out/recipe.sha256"  # a half-built output is never taken as current

# --- initramfs: load the modules for a virtio disk with ext4 and for the
# virtio balloon (free page reporting: pages the guest frees go back to the
# host, which punches them out of the shared RAM file), then switch root.
init=$stage/initramfs
mkdir -p "$init"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$busybox" "$init/bin/busybox"
: > "$init/modules.order"
for m in virtio_pci virtio_blk ext4 virtio_balloon; do
  modprobe -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
  base=$(basename "$ko")
  case "$ko" in
    *.ko.xz) xz -dc "$ko" > "$init/lib/modules/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) zstd -qdc "$ko" > "$init/lib/modules/${base%.zst}"; base=${base%.zst} ;;
    *) cp "$ko" "$init/lib/modules/$base" ;;
  esac
  echo "$base" >> "$init/modules.order"
done
[ -s "$init/modules.order" ] || die "modprobe found no modules for virtio_blk/ext4 in kernel $kver"
cat > "$init/init" <<'EOF'
#!/bin/busybox sh
# First stage: make the root disk reachable, then hand over to it.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules.order); do
  /bin/busybox insmod "/lib/modules/$m" 2>/dev/null  # some (crc32c-intel) need CPU features; others stand in
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox usleep 50000; i=$((i + 1)); done
if ! /bin/busybox mount -t ext4 -o rw /dev/vda /newroot; then
  echo "vmsync-initramfs: cannot mount the root disk /dev/vda" > /dev/console
  exec /bin/busybox sh
fi
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
EOF
chmod 755 "$init/init"
(cd "$init" && find . | cpio --quiet -H newc -o --owner=0:0) | gzip -9 > "$stage/initrd.img"

# --- root disk: busybox, an init that runs the workload, and what it needs.
root=$stage/root
mkdir -p "$root"/{bin,sbin,etc/vmsync,proc,sys,dev,tmp,root,var/lib/vmsync,media,usr/bin,lib64}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
cp "$script" "$root/etc/vmsync/workload.sh"
chmod 755 "$root/etc/vmsync/workload.sh"
echo "$name" > "$root/etc/vmsync/workload-name"
cat > "$root/sbin/init" <<'EOF'
#!/bin/sh
# Second stage: mount the kernel file systems, run the workload on the serial console.
export PATH=/bin:/usr/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
[ -c /dev/ttyS0 ] || mount -t devtmpfs dev /dev
hostname vmsync-guest
VMSYNC_DURATION=60
for word in $(cat /proc/cmdline); do
  case "$word" in vmsync.duration=*) VMSYNC_DURATION=${word#vmsync.duration=} ;; esac
done
export VMSYNC_DURATION HOME=/root
name=$(cat /etc/vmsync/workload-name)
echo "vmsync-guest: workload $name starting" > /dev/ttyS0
/etc/vmsync/workload.sh > /dev/ttyS0 2>&1 < /dev/null
echo "vmsync-guest: workload $name ended ($?)" > /dev/ttyS0
sync
while :; do sleep 3600; done  # init must not exit
EOF
chmod 755 "$root/sbin/init"

# Host binaries a workload needs, with their shared libraries and the loader.
for b in $needs; do
  path=$(command -v "$b") || die "workload $name needs '$b', which is not installed here (apt-get install it)"
  cp -L "$path" "$root/usr/bin/$b"
  ldd "$path" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
    [ -f "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
if [ -n "$needs" ]; then
  mkdir -p "$root/lib64"
  cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi

# Media made at build time with Debian's ffmpeg, so the guest decodes real streams.
make_asset() {
  case "$1" in
    video) ffmpeg -nostdin -loglevel error -f lavfi -i "testsrc2=size=320x240:rate=25" -t 30 \
             -c:v libx264 -preset veryfast -pix_fmt yuv420p -g 50 "$root/media/clip.mp4" ;;
    music) ffmpeg -nostdin -loglevel error -f lavfi -i "sine=frequency=440:sample_rate=44100:duration=30" \
             -f lavfi -i "sine=frequency=660:sample_rate=44100:duration=30" -filter_complex amix=inputs=2 \
             -c:a libvorbis -q:a 4 "$root/media/music.ogg" ;;
    *) die "unknown asset '$1' in workload $name" ;;
  esac
}
for a in $assets; do
  command -v ffmpeg >/dev/null || die "asset '$a' needs ffmpeg on the build machine (apt-get install ffmpeg)"
  make_asset "$a"
done

need_kb=$(du -sk "$root" | cut -f1)
[ $((need_kb / 1024 + 16)) -le "$disk_mb" ] || die "the root files need $((need_kb / 1024)) MiB; raise --disk-mb above $disk_mb"
rm -f "$stage/disk.img"
truncate -s "${disk_mb}M" "$stage/disk.img"
mkfs.ext4 -q -F -L vmsync-root -E root_owner=0:0 -d "$root" "$stage/disk.img"

cp "/boot/vmlinuz-$kver" "$out/vmlinuz"
mv "$stage/initrd.img" "$out/initrd.img"
mv "$stage/disk.img" "$out/disk.img"
echo "console=ttyS0 panic=-1 quiet loglevel=3 rootwait" > "$out/cmdline"
cat > "$out/spec.json" <<EOF
{"workload": "$name", "kernel": "$kver", "memory_mb": $memory_mb, "disk_bytes": $((disk_mb * 1024 * 1024))}
EOF
echo "$recipe" > "$out/recipe.sha256"
echo "vm-images: done: $out"
