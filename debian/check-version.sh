#!/bin/sh
# The package version (debian/changelog, without the Debian revision) must be
# the version CMake compiles into `vmsync --version` (project() in
# CMakeLists.txt): a release changes both. Run from the top of the tree.
set -eu
top=${1:-.}
cmake_version=$(sed -n 's/^project(vmsync VERSION \([0-9][0-9.]*\).*/\1/p' "$top/CMakeLists.txt")
package_version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
upstream=${package_version%-*}
if [ -z "$cmake_version" ]; then
	echo "check-version: no 'project(vmsync VERSION X.Y.Z' line in $top/CMakeLists.txt" >&2
	exit 1
fi
if [ "$upstream" != "$cmake_version" ]; then
	echo "check-version: debian/changelog is at $package_version but CMakeLists.txt's project() says $cmake_version;" \
		"add a changelog entry for $cmake_version-1 (dch -v $cmake_version-1) or fix project()" >&2
	exit 1
fi
echo "check-version: $package_version agrees with CMake's $cmake_version"
