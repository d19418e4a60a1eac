// Progress of long transfers in the logs: on a slow link a checkpoint may
// take minutes, and the log must say it is moving.
#pragma once

#include <kj/async.h>
#include <kj/timer.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace vmsync {

/// Reads how many bytes the link has carried so far (nullopt: unknown).
using BytesCarried = std::function<std::optional<std::uint64_t>()>;

/// Logs, every `period` until the promise is dropped, how much of `totalBytes`
/// of `what` has been carried since the call, and at what rate. Says nothing
/// for a transfer done within the first period.
kj::Promise<void> logTransferProgress(kj::Timer& timer, std::string what, std::uint64_t totalBytes,
                                      BytesCarried carried, kj::Duration period = 5 * kj::SECONDS);

}  // namespace vmsync
