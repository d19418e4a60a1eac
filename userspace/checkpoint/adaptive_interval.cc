#include "checkpoint/adaptive_interval.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>

namespace vmsync {

namespace {

/// Weight of the newest measurement in the running estimates: the link and
/// the guest change within seconds, one odd push should not swing the interval.
constexpr double kNewest = 0.3;

double blend(double estimate, double sample) { return estimate == 0 ? sample : (1 - kNewest) * estimate + kNewest * sample; }

}  // namespace

AdaptiveInterval::AdaptiveInterval(std::chrono::milliseconds targetSwitch, double initialSeconds,
                                   std::uint64_t deviceStateBytes, double minSeconds, double maxSeconds)
    : target_(static_cast<double>(targetSwitch.count()) / 1000.0),
      min_(minSeconds),
      max_(maxSeconds),
      interval_(std::clamp(initialSeconds, minSeconds, maxSeconds)),
      deviceState_(static_cast<double>(deviceStateBytes)) {}

bool AdaptiveInterval::onPush(std::uint64_t wireBytes, double sinceLastHarvestSeconds, double harvestSeconds,
                              double pushSeconds) {
  if (pushSeconds <= 0 || sinceLastHarvestSeconds <= 0) return false;
  const double bytes = static_cast<double>(wireBytes);
  linkRate_ = blend(linkRate_, bytes / pushSeconds);
  dirtyRate_ = blend(dirtyRate_, bytes / sinceLastHarvestSeconds);
  overheadSeconds_ = blend(overheadSeconds_, harvestSeconds + pushSeconds);
  // 2 * (dirtyRate * (interval + overhead) + deviceState) / linkRate <= target
  const double longest = ((target_ * linkRate_ / 2 - deviceState_) / dirtyRate_) - overheadSeconds_;
  reachable_ = longest >= min_;
  interval_ = std::clamp(longest, min_, max_);
  return true;
}

double AdaptiveInterval::expectedFinalSeconds() const {
  if (linkRate_ == 0) return 0;
  return 2 * (dirtyRate_ * (interval_ + overheadSeconds_) + deviceState_) / linkRate_;
}

double processCpuSeconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

void logAdaptiveInterval(const std::string& device, const AdaptiveInterval& adaptive, std::uint32_t targetMs,
                         std::uint64_t bytesPushed) {
  spdlog::info("{}: adaptive interval {:.2f} s: link {:.2f} Mbit/s, guest {:.0f} KiB/s of checkpoint, final "
               "checkpoint expected in {:.0f} ms (target {} ms{}); cost so far: CPU {:.2f} s, {:.1f} MiB pushed",
               device, adaptive.intervalSeconds(), adaptive.linkBytesPerSecond() * 8 / 1e6,
               adaptive.dirtyBytesPerSecond() / 1024, adaptive.expectedFinalSeconds() * 1000, targetMs,
               adaptive.reachable() ? "" : ", out of reach even at the shortest interval", processCpuSeconds(),
               bytesPushed / 1048576.0);
}

}  // namespace vmsync
