// The checkpoint interval chosen from the link and the guest: frequent
// enough that a switch's final checkpoint travels in under a target time.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace vmsync {

/// Picks the interval between incremental checkpoints for `--target-switch-ms`.
///
/// At a switch the final checkpoint carries what the guest changed since the
/// last harvest: at most one interval plus the push under way. With the
/// checkpoint bytes the guest produces per second (its dirty rate, measured
/// from incremental checkpoints) and the rate pushes reach the server at
/// (measured from push timings, so the link's latency counts), the final
/// transfer is expected to take dirtyRate * (interval + push) / linkRate; the
/// interval is the longest that keeps this under the target. Longer intervals
/// cost fewer bytes and less CPU: a page rewritten within one interval is
/// shipped once.
class AdaptiveInterval {
 public:
  AdaptiveInterval(std::chrono::milliseconds targetSwitch, double initialSeconds, double minSeconds = 0.2,
                   double maxSeconds = 30.0);

  /// An incremental checkpoint of `wireBytes`, harvested `sinceLastHarvestSeconds`
  /// after the previous one, reached the server in `pushSeconds`.
  void onPush(std::uint64_t wireBytes, double sinceLastHarvestSeconds, double pushSeconds);

  /// The interval to wait before the next checkpoint.
  double intervalSeconds() const { return interval_; }
  /// The estimates behind it (0 before the first push).
  double linkBytesPerSecond() const { return linkRate_; }
  double dirtyBytesPerSecond() const { return dirtyRate_; }
  /// Expected transfer time of a final checkpoint at the current interval.
  double expectedFinalSeconds() const;
  /// False when even the shortest interval is expected to miss the target.
  bool reachable() const { return reachable_; }

 private:
  double target_;
  double min_;
  double max_;
  double interval_;
  double linkRate_ = 0;
  double dirtyRate_ = 0;
  double pushSeconds_ = 0;
  bool reachable_ = true;
};

/// CPU time this process has used (user + system), in seconds.
double processCpuSeconds();

/// Logs the interval `adaptive` chose, why, and what checkpointing has cost
/// so far: the daemon's CPU time and `bytesPushed` (a phone's energy goes to both).
void logAdaptiveInterval(const std::string& device, const AdaptiveInterval& adaptive, std::uint32_t targetMs,
                         std::uint64_t bytesPushed);

}  // namespace vmsync
