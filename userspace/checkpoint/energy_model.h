// What syncing costs a phone's battery: the radio's power states around each
// push (promotion, transfer, the tail that outlasts it) and the CPU time.
//
// Bytes are only a proxy for energy: a cellular radio stays in a high-power
// state for seconds after the last packet (LTE's tail is over 11 s), so ten
// small pushes can cost more than one large one. The daemon's energy-aware
// interval and `vmsync study` price pushes with this model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vmsync {

/// One stage of a radio's tail: after the last byte the radio stays
/// `seconds` at `watts` before it steps down to the next stage, and after the
/// last stage to idle.
struct TailPhase {
  double seconds = 0;
  double watts = 0;
};

/// The power model of one kind of radio, after Huang et al., "A Close
/// Examination of Performance and Power Characteristics of 4G LTE Networks"
/// (MobiSys 2012), Tables 3 and 4. From idle a transfer first pays a
/// promotion (`promotionSeconds` at `promotionWatts`, the data waiting for
/// it); while data moves the radio draws
///
///     P = upWattsPerMbit * up + downWattsPerMbit * down + activeWatts
///
/// with `up` and `down` the throughputs in Mbit/s; after the last byte the
/// tail phases follow. A transfer that starts inside the tail cuts it short
/// and pays no promotion; one that starts after it pays a new one. Every
/// figure is power above the radio's idle state (paging in idle is paid
/// whether the device syncs or not, so it is left out).
struct RadioPowerModel {
  std::string name;  // lte, 3g, wifi: as the lab's link profiles
  double promotionSeconds = 0;
  double promotionWatts = 0;
  double upWattsPerMbit = 0;    // alpha_u
  double downWattsPerMbit = 0;  // alpha_d
  double activeWatts = 0;       // beta
  std::vector<TailPhase> tail;

  double tailSeconds() const;
  /// Energy of the first `seconds` of the tail (all of it when longer).
  double tailJoules(double seconds) const;
};

/// The models of every kind: lte, 3g, wifi.
const std::vector<RadioPowerModel>& radioPowerModels();
/// The model called `name`; throws Error naming the known ones.
const RadioPowerModel& radioPowerModel(const std::string& name);

/// Power of one phone CPU core kept busy, in watts: what a CPU-second of the
/// daemon costs. 1.2 W is the increment per additional loaded Cortex-A73 core
/// at 2.36 GHz measured on a Kirin 960 (AnandTech, "HiSilicon Kirin 960",
/// 2017, "System Active Power: CPU Load": +1033, +1237 and +1230 mW for the
/// second, third and fourth core).
inline constexpr double kPhoneCoreWatts = 1.2;

/// Rates of the link a device pushes over, in Mbit/s.
struct LinkRates {
  double upMbit = 0;
  double downMbit = 0;
};

/// deviceEnergy's account runs until every tail has run out.
inline constexpr double kNoEnd = 1e300;

/// One exchange on the link: sent from `startSeconds`, `bytesUp` from the
/// device and `bytesDown` to it, moving at the link's rates.
struct RadioTransfer {
  double startSeconds = 0;
  std::uint64_t bytesUp = 0;
  std::uint64_t bytesDown = 0;
};

/// Joules, split by what they were spent on.
struct EnergyBreakdown {
  double promotion = 0;
  double transfer = 0;
  double tail = 0;
  double cpu = 0;
  int promotions = 0;      // times the radio left idle
  double busySeconds = 0;  // time data was moving

  double radio() const { return promotion + transfer + tail; }
  double total() const { return radio() + cpu; }
};

/// What `transfers` and `cpuSeconds` of CPU cost a device whose radio is
/// `radio` on a link of `rates`. The radio starts idle; the last tail runs to
/// its end, or is cut at `endSeconds` when that comes first (the account of
/// a window of time; no transfer may start after it). Transfers share the one
/// link: one that starts while another is still moving (or still waiting for
/// the promotion) waits for it. A transfer moves for max(bytesUp / up rate,
/// bytesDown / down rate). Throws Error on a rate that is not positive.
EnergyBreakdown deviceEnergy(const RadioPowerModel& radio, const LinkRates& rates,
                             std::vector<RadioTransfer> transfers, double cpuSeconds = 0,
                             double cpuWatts = kPhoneCoreWatts, double endSeconds = kNoEnd);

/// A steady stream of pushes: one of `bytesPerPush` every `cycleSeconds`,
/// each costing `cpuSecondsPerPush` of CPU.
struct PeriodicPushes {
  double cycleSeconds = 1;
  double bytesPerPush = 0;
  double cpuSecondsPerPush = 0;
};

/// Joules per minute of `pushes` once the radio has settled into its
/// pattern (the first push's promotion and the last tail left out), computed
/// with deviceEnergy over enough cycles that the pattern repeats.
EnergyBreakdown energyPerMinute(const RadioPowerModel& radio, const LinkRates& rates, const PeriodicPushes& pushes,
                                double cpuWatts = kPhoneCoreWatts);

}  // namespace vmsync
