// What a build of vmsync is: its version and the git commit it was built from.
#pragma once

namespace vmsync {

/// The release version, from the top CMakeLists.txt's project() (e.g. "0.1.0").
const char* buildVersion();

/// The git commit of the sources, 12 hex digits with "-dirty" when tracked
/// files differed from it, or "unknown" when built outside a git checkout
/// without VMSYNC_GIT_COMMIT.
const char* buildCommit();

}  // namespace vmsync
