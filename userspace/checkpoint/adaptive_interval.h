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
/// and the interval is the longest that keeps this under the target. Longer
/// intervals cost fewer bytes and less CPU: a page rewritten within one
/// interval is shipped once.
class AdaptiveInterval {
 public:
  /// `deviceStateBytes`: size of the VMM's device state in a final checkpoint.
  AdaptiveInterval(std::chrono::milliseconds targetSwitch, double initialSeconds, std::uint64_t deviceStateBytes,
                   double minSeconds = 0.2, double maxSeconds = 30.0);

  /// An incremental checkpoint of `wireBytes`, harvested `sinceLastHarvestSeconds`
  /// after the previous one in `harvestSeconds`, reached the server in `pushSeconds`.
  /// Returns false when it tells nothing (the first push after activation).
  bool onPush(std::uint64_t wireBytes, double sinceLastHarvestSeconds, double harvestSeconds, double pushSeconds);

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
  double deviceState_;
  double linkRate_ = 0;
  double dirtyRate_ = 0;
  double overheadSeconds_ = 0;  // harvest + push: the rest of a cycle
  bool reachable_ = true;
};

/// CPU time this process has used (user + system), in seconds.
double processCpuSeconds();

/// Logs the interval `adaptive` chose, why, and what checkpointing has cost
/// so far: the daemon's CPU time and `bytesPushed` (a phone's energy goes to both).
void logAdaptiveInterval(const std::string& device, const AdaptiveInterval& adaptive, std::uint32_t targetMs,
                         std::uint64_t bytesPushed);

}  // namespace vmsync
