// The checkpoint interval chosen from the link and the guest: frequent
// enough that a switch's final checkpoint travels in under a target time.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "checkpoint/energy_model.h"

namespace vmsync {

/// What `--optimize` asks of the interval, among those whose final
/// checkpoint is expected to travel within the target.
enum class IntervalGoal {
  /// The longest: a page rewritten within one interval is shipped once. The
  /// behaviour of `--target-switch-ms` before `--optimize` existed.
  bytes,
  /// The one with the least expected energy per minute (radio and CPU,
  /// energy_model.h): pushes far enough apart that the radio sleeps between
  /// them, or close enough that each lands in the previous one's tail.
  energy,
};

/// "bytes" or "energy"; throws Error naming the goals.
IntervalGoal parseIntervalGoal(const std::string& name);
std::string_view intervalGoalName(IntervalGoal goal);

/// Picks the interval between incremental checkpoints for `--target-switch-ms`.
///
/// At a switch the final checkpoint carries what the guest changed since the
/// last harvest (at most one cycle: the interval, the harvest and the push
/// under way) and the VMM's device state. It goes up the active device's link
/// and then down the target's. With the checkpoint bytes the guest produces
/// per second (its dirty rate, measured from incremental checkpoints) and the
/// rate pushes reach the server at (measured from push timings, so the link's
/// latency counts), and taking the target's downlink to be at least as fast
/// as this uplink (as on the profiles' links), the transfer is expected to take
///
///     2 * (dirtyRate * (interval + harvest + push) + deviceState) / linkRate
///
/// and the interval is chosen among those that keep this under the target:
/// the longest (IntervalGoal::bytes; longer intervals cost fewer bytes and
/// less CPU: a page rewritten within one interval is shipped once), or the
/// one with the least expected energy (IntervalGoal::energy).
class AdaptiveInterval {
 public:
  /// `deviceStateBytes`: size of the VMM's device state in a final checkpoint.
  AdaptiveInterval(std::chrono::milliseconds targetSwitch, double initialSeconds, std::uint64_t deviceStateBytes,
                   double minSeconds = 0.2, double maxSeconds = 30.0);

  /// Chooses for `goal`, pricing energy with `radio` (by default: bytes, and
  /// the estimate logged for lte).
  void setGoal(IntervalGoal goal, const RadioPowerModel& radio);
  IntervalGoal goal() const { return goal_; }
  const RadioPowerModel& radio() const { return *radio_; }

  /// An incremental checkpoint of `wireBytes`, harvested `sinceLastHarvestSeconds`
  /// after the previous one in `harvestSeconds`, reached the server in `pushSeconds`;
  /// `cpuSeconds`: the CPU the daemon spent since the previous push (0: not
  /// known, taken to be the harvest time). Returns false when it tells nothing
  /// (the first push after activation).
  bool onPush(std::uint64_t wireBytes, double sinceLastHarvestSeconds, double harvestSeconds, double pushSeconds,
              double cpuSeconds = 0);

  /// The interval to wait before the next checkpoint.
  double intervalSeconds() const { return interval_; }
  /// The estimates behind it (0 before the first push).
  double linkBytesPerSecond() const { return linkRate_; }
  double dirtyBytesPerSecond() const { return dirtyRate_; }
  /// Expected transfer time of a final checkpoint at the current interval.
  double expectedFinalSeconds() const;
  /// False when even the shortest interval is expected to miss the target.
  bool reachable() const { return reachable_; }

  /// What checkpointing is expected to cost per minute at `intervalSeconds`
  /// (at the current interval without it): the guest's checkpoint bytes,
  /// pushed over a link of the measured rate, one push every interval plus
  /// harvest and push, each with the measured CPU. Zero before the first push.
  struct Cost {
    double bytesPerMinute = 0;
    EnergyBreakdown joulesPerMinute;
  };
  Cost expectedCost() const { return expectedCost(interval_); }
  Cost expectedCost(double intervalSeconds) const;

 private:
  double leastEnergyInterval(double longest) const;

  double target_;
  double min_;
  double max_;
  double interval_;
  double deviceState_;
  double linkRate_ = 0;
  double dirtyRate_ = 0;
  double overheadSeconds_ = 0;  // harvest + push: the rest of a cycle
  double cpuPerPush_ = 0;       // daemon CPU seconds per cycle
  bool reachable_ = true;
  IntervalGoal goal_ = IntervalGoal::bytes;
  const RadioPowerModel* radio_;
};

/// CPU time this process has used (user + system), in seconds.
double processCpuSeconds();

/// Logs the interval `adaptive` chose, why, what it is expected to cost per
/// minute (bytes, and joules on its radio), and what checkpointing has cost
/// so far: the daemon's CPU time and `bytesPushed` (a phone's energy goes to both).
void logAdaptiveInterval(const std::string& device, const AdaptiveInterval& adaptive, std::uint32_t targetMs,
                         std::uint64_t bytesPushed);

}  // namespace vmsync
