#include "transport/transfer_progress.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "transport/rpc_util.h"

namespace vmsync {

namespace {

kj::Promise<void> nextReport(kj::Timer& timer, std::string what, std::uint64_t totalBytes, BytesCarried carried,
                             kj::Duration period, std::optional<std::uint64_t> start, std::uint64_t startNs) {
  return timer.afterDelay(period).then([&timer, what = kj::mv(what), totalBytes, carried = kj::mv(carried), period,
                                        start, startNs]() mutable -> kj::Promise<void> {
    const double seconds = static_cast<double>(nowNs() - startNs) / 1e9;
    std::optional<std::uint64_t> now = carried();
    if (start && now && *now >= *start) {
      const std::uint64_t done = std::min(*now - *start, totalBytes);
      spdlog::info("{}: {:.1f} of {:.1f} MiB sent after {:.0f} s ({:.0f}%, {:.2f} Mbit/s)", what, done / 1048576.0,
                   totalBytes / 1048576.0, seconds, totalBytes ? 100.0 * done / totalBytes : 100.0,
                   done * 8 / seconds / 1e6);
    } else {
      spdlog::info("{}: {:.1f} MiB on its way for {:.0f} s", what, totalBytes / 1048576.0, seconds);
    }
    return nextReport(timer, kj::mv(what), totalBytes, kj::mv(carried), period, start, startNs);
  });
}

}  // namespace

kj::Promise<void> logTransferProgress(kj::Timer& timer, std::string what, std::uint64_t totalBytes,
                                      BytesCarried carried, kj::Duration period) {
  std::optional<std::uint64_t> start = carried();
  return nextReport(timer, kj::mv(what), totalBytes, kj::mv(carried), period, start, nowNs());
}

}  // namespace vmsync
