#!/usr/bin/env bash
# `make deb`: the vmsync and vmsync-dkms packages, built by dpkg-buildpackage
# (binary only, unsigned) from a copy of the checkout's tracked files, so that
# neither the build nor dpkg-buildpackage's output (written beside the source
# folder) touches the checkout. The packages land in OUT.
#
#   packaging/build-deb.sh OUT [JOBS]
#
# `vmsync --version` names the checkout's commit (with -dirty when tracked
# files differ from it), as a build in the checkout does. A compiler launcher
# in the environment (CMAKE_CXX_COMPILER_LAUNCHER=ccache) is used.
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OUT [JOBS]" >&2; exit 2; }
top=$(cd "$(dirname "$0")/.." && pwd)
jobs=${2:-$(nproc)}
case $jobs in '' | *[!0-9]* | 0) echo "build-deb: JOBS must be a positive number, not '$jobs'" >&2; exit 2 ;; esac
mkdir -p "$1"
out=$(cd "$1" && pwd)

git -C "$top" rev-parse --git-dir >/dev/null 2>&1 ||
	{ echo "build-deb: $top is not a git checkout: the packages are built from its tracked files" >&2; exit 1; }
"$top/debian/check-version.sh" "$top"
version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
commit=$(git -C "$top" rev-parse --short=12 HEAD)
git -C "$top" diff --quiet HEAD -- || commit="$commit-dirty"

work=$out/work
source=$work/vmsync-${version%-*}
rm -rf "$work"
mkdir -p "$source"
# Tracked files as they are in the work tree (a tracked file deleted there
# stays out).
git -C "$top" ls-files -z | tar -C "$top" --null --files-from=- --ignore-failed-read -cf - |
	tar -C "$source" -xf -
[ -f "$source/debian/rules" ] || { echo "build-deb: copying the tracked files to $source failed" >&2; exit 1; }

# The copy has no git metadata; git must not find the checkout's above it
# either (when OUT is inside the checkout): the commit comes from here.
export VMSYNC_GIT_COMMIT=$commit
export GIT_CEILING_DIRECTORIES=$work
# debhelper gives the build a HOME of its own, where ccache would start an
# empty cache with default settings: a build through ccache keeps the
# user's cache and settings.
case "${CMAKE_CXX_COMPILER_LAUNCHER:-} ${CMAKE_C_COMPILER_LAUNCHER:-}" in
*ccache*)
	if [ -z "${CCACHE_CONFIGPATH:-}" ]; then
		for config in "${CCACHE_DIR:-$HOME/.ccache}/ccache.conf" "${XDG_CONFIG_HOME:-$HOME/.config}/ccache/ccache.conf"; do
			if [ -f "$config" ]; then export CCACHE_CONFIGPATH=$config; break; fi
		done
	fi
	CCACHE_DIR=${CCACHE_DIR:-$(ccache -k cache_dir)}
	export CCACHE_DIR
	;;
esac
echo "build-deb: vmsync $version at commit $commit, in $source"
(cd "$source" && dpkg-buildpackage -b -us -uc -j"$jobs")

rm -f "$out"/*.deb "$out"/*.buildinfo "$out"/*.changes
mv "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes "$out/"
rm -rf "$work"
echo "build-deb: packages in $out:"
ls -1 "$out"/*.deb
