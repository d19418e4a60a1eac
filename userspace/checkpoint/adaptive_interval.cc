#include "checkpoint/adaptive_interval.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "base/error.h"

namespace vmsync {

namespace {

/// Weight of the newest measurement in the running estimates: the link and
/// the guest change within seconds, one odd push should not swing the interval.
constexpr double kNewest = 0.3;

double blend(double estimate, double sample) { return estimate == 0 ? sample : (1 - kNewest) * estimate + kNewest * sample; }

/// Intervals the energy goal weighs between the shortest and the longest
/// admissible one, besides those just inside each stage of the radio's tail.
constexpr int kCandidates = 100;

/// Costs within this fraction of the least count as equal; the longest of
/// them is taken (fewer bytes where the guest rewrites pages).
constexpr double kEnergyTolerance = 0.005;

}  // namespace

IntervalGoal parseIntervalGoal(const std::string& name) {
  if (name == "bytes") return IntervalGoal::bytes;
  if (name == "energy") return IntervalGoal::energy;
  fail("no interval goal called '{}'; --optimize takes bytes or energy", name);
}

std::string_view intervalGoalName(IntervalGoal goal) { return goal == IntervalGoal::energy ? "energy" : "bytes"; }

AdaptiveInterval::AdaptiveInterval(std::chrono::milliseconds targetSwitch, double initialSeconds,
                                   std::uint64_t deviceStateBytes, double minSeconds, double maxSeconds)
    : target_(static_cast<double>(targetSwitch.count()) / 1000.0),
      min_(minSeconds),
      max_(maxSeconds),
      interval_(std::clamp(initialSeconds, minSeconds, maxSeconds)),
      deviceState_(static_cast<double>(deviceStateBytes)),
      radio_(&radioPowerModel("lte")) {}

void AdaptiveInterval::setGoal(IntervalGoal goal, const RadioPowerModel& radio) {
  goal_ = goal;
  radio_ = &radio;
}

bool AdaptiveInterval::onPush(std::uint64_t wireBytes, double sinceLastHarvestSeconds, double harvestSeconds,
                              double pushSeconds, double cpuSeconds) {
  if (pushSeconds <= 0 || sinceLastHarvestSeconds <= 0) return false;
  const double bytes = static_cast<double>(wireBytes);
  linkRate_ = blend(linkRate_, bytes / pushSeconds);
  dirtyRate_ = blend(dirtyRate_, bytes / sinceLastHarvestSeconds);
  overheadSeconds_ = blend(overheadSeconds_, harvestSeconds + pushSeconds);
  cpuPerPush_ = blend(cpuPerPush_, cpuSeconds > 0 ? cpuSeconds : harvestSeconds);
  // 2 * (dirtyRate * (interval + overhead) + deviceState) / linkRate <= target
  const double longest = ((target_ * linkRate_ / 2 - deviceState_) / dirtyRate_) - overheadSeconds_;
  reachable_ = longest >= min_;
  interval_ = std::clamp(longest, min_, max_);
  if (goal_ == IntervalGoal::energy && reachable_) interval_ = leastEnergyInterval(interval_);
  return true;
}

AdaptiveInterval::Cost AdaptiveInterval::expectedCost(double intervalSeconds) const {
  Cost cost;
  if (linkRate_ <= 0) return cost;
  const double cycle = intervalSeconds + overheadSeconds_;
  cost.bytesPerMinute = dirtyRate_ * 60;
  // The link's measured rate stands for its uplink; what comes down (the
  // acknowledgements) is small beside it, and the downlink is taken to be at
  // least as fast.
  const LinkRates rates{.upMbit = linkRate_ * 8 / 1e6, .downMbit = linkRate_ * 8 / 1e6};
  cost.joulesPerMinute = energyPerMinute(
      *radio_, rates,
      {.cycleSeconds = cycle, .bytesPerPush = dirtyRate_ * cycle, .cpuSecondsPerPush = cpuPerPush_});
  return cost;
}

double AdaptiveInterval::leastEnergyInterval(double longest) const {
  std::vector<double> candidates;
  for (int i = 0; i <= kCandidates; ++i) candidates.push_back(min_ + (longest - min_) * i / kCandidates);
  // Just inside each stage of the tail: the push before lands in it.
  const double pushSeconds = dirtyRate_ / linkRate_;  // seconds of link per second of cycle
  double stageEnd = 0;
  for (const auto& phase : radio_->tail) {
    stageEnd += phase.seconds;
    // cycle - push = stageEnd, with push = pushSeconds * cycle
    if (pushSeconds < 1) {
      const double interval = stageEnd * 0.999 / (1 - pushSeconds) - overheadSeconds_;
      if (interval > min_ && interval < longest) candidates.push_back(interval);
    }
  }
  std::vector<std::pair<double, double>> priced;  // interval, joules per minute
  double least = 0;
  for (double interval : candidates) {
    const double joules = expectedCost(interval).joulesPerMinute.total();
    if (priced.empty() || joules < least) least = joules;
    priced.emplace_back(interval, joules);
  }
  double chosen = min_;
  for (const auto& [interval, joules] : priced)
    if (joules <= least * (1 + kEnergyTolerance)) chosen = std::max(chosen, interval);
  return chosen;
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
  const AdaptiveInterval::Cost cost = adaptive.expectedCost();
  spdlog::info("{}: adaptive interval {:.2f} s (optimizing {}): link {:.2f} Mbit/s, guest {:.0f} KiB/s of "
               "checkpoint, final checkpoint expected in {:.0f} ms (target {} ms{}); expected per minute: "
               "{:.1f} MiB, {:.1f} J on {} (radio {:.1f} J: promotion {:.1f}, transfer {:.1f}, tail {:.1f}; CPU "
               "{:.1f} J); cost so far: CPU {:.2f} s, {:.1f} MiB pushed",
               device, adaptive.intervalSeconds(), intervalGoalName(adaptive.goal()),
               adaptive.linkBytesPerSecond() * 8 / 1e6, adaptive.dirtyBytesPerSecond() / 1024,
               adaptive.expectedFinalSeconds() * 1000, targetMs,
               adaptive.reachable() ? "" : ", out of reach even at the shortest interval",
               cost.bytesPerMinute / 1048576.0, cost.joulesPerMinute.total(), adaptive.radio().name,
               cost.joulesPerMinute.radio(), cost.joulesPerMinute.promotion, cost.joulesPerMinute.transfer,
               cost.joulesPerMinute.tail, cost.joulesPerMinute.cpu, processCpuSeconds(), bytesPushed / 1048576.0);
}

}  // namespace vmsync
