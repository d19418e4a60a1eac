// The chaos harness's durability checker: every checkpoint a device logged as
// acknowledged is looked up in the server's data directory, independently of
// the code under test (it shares only the record reader and the digest).
#pragma once

#include <string>

#include "chaos.h"

namespace vmsync::testing {

/// Checks every acknowledgement in the device logs under `dir` against the
/// server's data directory there: fills `result`'s acknowledged, checked,
/// folded, abandoned and lost counts, and adds a failure (prefixed `when`)
/// for each one missing or different.
void checkDurability(const std::string& dir, ChaosResult& result, const std::string& when);

}  // namespace vmsync::testing
