#include "checkpoint/energy_model.h"

#include <algorithm>
#include <cmath>

#include "base/error.h"

namespace vmsync {

namespace {

// Huang et al., MobiSys 2012: Table 3 (promotion and tail: time and power,
// measured on an HTC ThunderBolt) and Table 4 (the data-transfer model, mW
// per Mbit/s and the base power beta). Figures in W and s. docs/benchmarks.md
// ("Energy") says which of them could be checked against a second source.
const std::vector<RadioPowerModel> kModels{
    {.name = "lte",
     .promotionSeconds = 0.2601,
     .promotionWatts = 1.2107,
     .upWattsPerMbit = 0.43839,
     .downWattsPerMbit = 0.05197,
     .activeWatts = 1.28804,
     // The tail: RRC_CONNECTED after the last packet (continuous reception,
     // then DRX) until the inactivity timer sends the radio to RRC_IDLE.
     .tail = {{11.576, 1.060}}},
    {.name = "3g",
     .promotionSeconds = 0.5821,
     .promotionWatts = 0.6594,
     .upWattsPerMbit = 0.86898,
     .downWattsPerMbit = 0.12212,
     .activeWatts = 0.81788,
     // DCH, then FACH, then IDLE. A transfer inside FACH is taken to pay no
     // promotion (a simplification: a large one goes back to DCH first).
     .tail = {{8.0882, 0.8039}, {0.8242, 0.6013}}},
    {.name = "wifi",
     .promotionSeconds = 0.0791,
     .promotionWatts = 0.1244,
     .upWattsPerMbit = 0.28317,
     .downWattsPerMbit = 0.13701,
     .activeWatts = 0.13286,
     .tail = {{0.2381, 0.1193}}},
};

}  // namespace

double RadioPowerModel::tailSeconds() const {
  double seconds = 0;
  for (const auto& phase : tail) seconds += phase.seconds;
  return seconds;
}

double RadioPowerModel::tailJoules(double seconds) const {
  double joules = 0;
  for (const auto& phase : tail) {
    if (seconds <= 0) break;
    const double spent = std::min(seconds, phase.seconds);
    joules += spent * phase.watts;
    seconds -= spent;
  }
  return joules;
}

const std::vector<RadioPowerModel>& radioPowerModels() { return kModels; }

const RadioPowerModel& radioPowerModel(const std::string& name) {
  for (const auto& model : kModels)
    if (model.name == name) return model;
  fail("no radio power model called '{}'; the models are lte, 3g and wifi", name);
}

EnergyBreakdown deviceEnergy(const RadioPowerModel& radio, const LinkRates& rates,
                             std::vector<RadioTransfer> transfers, double cpuSeconds, double cpuWatts,
                             double endSeconds) {
  if (!(rates.upMbit > 0) || !(rates.downMbit > 0))
    fail("link rates must be positive (up {} Mbit/s, down {} Mbit/s)", rates.upMbit, rates.downMbit);
  if (cpuSeconds < 0) fail("CPU time cannot be negative ({} s)", cpuSeconds);
  std::stable_sort(transfers.begin(), transfers.end(),
                   [](const RadioTransfer& a, const RadioTransfer& b) { return a.startSeconds < b.startSeconds; });
  EnergyBreakdown energy;
  energy.cpu = cpuSeconds * cpuWatts;
  const double tailLength = radio.tailSeconds();
  bool inTail = false;     // the radio has moved data and its tail has not been settled
  double tailStart = 0;    // when the last byte moved
  for (const auto& transfer : transfers) {
    if (transfer.startSeconds > endSeconds)
      fail("a transfer at {} s starts after the account's end at {} s", transfer.startSeconds, endSeconds);
    // One link: a transfer waits for the one before it.
    double start = inTail ? std::max(transfer.startSeconds, tailStart) : transfer.startSeconds;
    const double sinceLastByte = inTail ? start - tailStart : 0;
    if (!inTail || sinceLastByte >= tailLength) {
      // Idle (or the tail ran out): the whole tail is paid, then a promotion.
      if (inTail) energy.tail += radio.tailJoules(tailLength);
      energy.promotion += radio.promotionSeconds * radio.promotionWatts;
      ++energy.promotions;
      start += radio.promotionSeconds;
    } else {
      energy.tail += radio.tailJoules(sinceLastByte);  // cut short: the radio is still connected
    }
    const double upSeconds = static_cast<double>(transfer.bytesUp) * 8 / (rates.upMbit * 1e6);
    const double downSeconds = static_cast<double>(transfer.bytesDown) * 8 / (rates.downMbit * 1e6);
    const double seconds = std::max(upSeconds, downSeconds);
    if (seconds > 0) {
      const double upMbit = static_cast<double>(transfer.bytesUp) * 8 / 1e6 / seconds;
      const double downMbit = static_cast<double>(transfer.bytesDown) * 8 / 1e6 / seconds;
      const double watts = radio.upWattsPerMbit * upMbit + radio.downWattsPerMbit * downMbit + radio.activeWatts;
      energy.transfer += watts * seconds;
      energy.busySeconds += seconds;
    }
    inTail = true;
    tailStart = start + seconds;
  }
  if (inTail) energy.tail += radio.tailJoules(std::min(tailLength, std::max(0.0, endSeconds - tailStart)));
  return energy;
}

EnergyBreakdown energyPerMinute(const RadioPowerModel& radio, const LinkRates& rates, const PeriodicPushes& pushes,
                                double cpuWatts) {
  if (!(pushes.cycleSeconds > 0)) fail("the time between pushes must be positive ({} s)", pushes.cycleSeconds);
  if (pushes.bytesPerPush < 0 || pushes.cpuSecondsPerPush < 0) fail("a push cannot cost negative bytes or CPU");
  // Costs of n and of n + m pushes differ by m cycles of the settled pattern:
  // the first promotion and the last tail are in both. The pattern repeats
  // at most every two cycles (promoted, then caught in the tail), so m is
  // even, and the pushes cover at least ten minutes.
  const auto bytes = static_cast<std::uint64_t>(std::llround(pushes.bytesPerPush));
  auto costOf = [&](int count) {
    std::vector<RadioTransfer> transfers;
    for (int i = 0; i < count; ++i) transfers.push_back({.startSeconds = i * pushes.cycleSeconds, .bytesUp = bytes});
    return deviceEnergy(radio, rates, std::move(transfers), count * pushes.cpuSecondsPerPush, cpuWatts);
  };
  const int warmUp = 4;
  int measured = static_cast<int>(std::ceil(600.0 / pushes.cycleSeconds));
  measured = std::clamp(measured + measured % 2, 2, 100'000);
  const EnergyBreakdown before = costOf(warmUp);
  const EnergyBreakdown after = costOf(warmUp + measured);
  const double perMinute = 60.0 / (measured * pushes.cycleSeconds);
  EnergyBreakdown rate;
  rate.promotion = (after.promotion - before.promotion) * perMinute;
  rate.transfer = (after.transfer - before.transfer) * perMinute;
  rate.tail = (after.tail - before.tail) * perMinute;
  rate.cpu = (after.cpu - before.cpu) * perMinute;
  rate.busySeconds = (after.busySeconds - before.busySeconds) * perMinute;
  rate.promotions = static_cast<int>(std::lround((after.promotions - before.promotions) * perMinute));
  return rate;
}

}  // namespace vmsync
