#include "checkpoint/adaptive_interval.h"

#include <gtest/gtest.h>

#include "base/error.h"

namespace vmsync {
namespace {

using std::chrono::milliseconds;

TEST(AdaptiveInterval, KeepsTheExpectedFinalTransferAtTheTarget) {
  AdaptiveInterval adaptive(milliseconds(1000), 1.0, 100'000);
  // 1 MB/s link, the guest makes 100 kB of checkpoint per second, harvests
  // take 0.05 s and pushes 0.1 s, the device state is 100 kB.
  for (int i = 0; i < 30; ++i) adaptive.onPush(100'000, 1.0, 0.05, 0.1);
  // 2 * (100 kB/s * (interval + 0.15 s) + 100 kB) / 1 MB/s = 1 s  =>  interval = 3.85 s
  EXPECT_NEAR(adaptive.intervalSeconds(), 3.85, 0.01);
  EXPECT_NEAR(adaptive.expectedFinalSeconds(), 1.0, 0.001);
  EXPECT_TRUE(adaptive.reachable());
}

TEST(AdaptiveInterval, ALargerDeviceStateLeavesLessForTheGuestsChanges) {
  AdaptiveInterval small(milliseconds(1000), 1.0, 100'000);
  AdaptiveInterval large(milliseconds(1000), 1.0, 300'000);
  for (int i = 0; i < 30; ++i) {
    small.onPush(100'000, 1.0, 0.05, 0.1);
    large.onPush(100'000, 1.0, 0.05, 0.1);
  }
  EXPECT_NEAR(small.intervalSeconds() - large.intervalSeconds(), 2.0, 0.01);
}

TEST(AdaptiveInterval, ShortensWhenTheLinkSlowsDown) {
  AdaptiveInterval adaptive(milliseconds(1000), 1.0, 0);
  for (int i = 0; i < 30; ++i) adaptive.onPush(100'000, 1.0, 0.05, 0.1);
  const double onFastLink = adaptive.intervalSeconds();
  for (int i = 0; i < 30; ++i) adaptive.onPush(100'000, 1.0, 0.05, 0.4);  // 250 kB/s now
  EXPECT_LT(adaptive.intervalSeconds(), onFastLink / 2);
  EXPECT_LE(adaptive.expectedFinalSeconds(), 1.0 + 1e-9);
}

TEST(AdaptiveInterval, SaysWhenTheTargetCannotBeMet) {
  AdaptiveInterval adaptive(milliseconds(100), 1.0, 0, 0.2, 30.0);
  // The guest makes more per second than the link carries in the target time.
  for (int i = 0; i < 30; ++i) adaptive.onPush(1'000'000, 1.0, 0.05, 2.0);
  EXPECT_DOUBLE_EQ(adaptive.intervalSeconds(), 0.2);
  EXPECT_FALSE(adaptive.reachable());
  EXPECT_GT(adaptive.expectedFinalSeconds(), 0.1);
}

TEST(AdaptiveInterval, AnIdleGuestWaitsTheLongestInterval) {
  AdaptiveInterval adaptive(milliseconds(500), 1.0, 0, 0.2, 30.0);
  for (int i = 0; i < 30; ++i) adaptive.onPush(200, 1.0, 0.01, 0.001);
  EXPECT_DOUBLE_EQ(adaptive.intervalSeconds(), 30.0);
}

// The energy goal. Synthetic rates: 100 kB of checkpoint per second of
// guest, pushed at 1 MB/s (8 Mbit/s), 50 ms of harvest per push.
void feed(AdaptiveInterval& adaptive) {
  for (int i = 0; i < 30; ++i) adaptive.onPush(100'000, 1.0, 0.05, 0.1, 0.05);
}

TEST(AdaptiveInterval, OnLteTheEnergyChoiceWaitsPastTheTailWhenTheTargetAllows) {
  // A 30 s target admits every interval up to the longest (30 s).
  AdaptiveInterval adaptive(milliseconds(30'000), 1.0, 100'000);
  adaptive.setGoal(IntervalGoal::energy, radioPowerModel("lte"));
  feed(adaptive);
  EXPECT_GT(adaptive.intervalSeconds(), radioPowerModel("lte").tailSeconds());
  EXPECT_LE(adaptive.expectedFinalSeconds(), 30.0 + 1e-9);
  // Pushes 1 s apart keep the radio out of idle all minute; pushes this far
  // apart let it sleep between them.
  const double atOneSecond = adaptive.expectedCost(1.0).joulesPerMinute.radio();
  const double chosen = adaptive.expectedCost().joulesPerMinute.radio();
  EXPECT_LT(chosen, 0.7 * atOneSecond) << chosen << " J/min against " << atOneSecond << " at 1 s";
  EXPECT_GT(adaptive.expectedCost().joulesPerMinute.promotions, 0);
  EXPECT_EQ(adaptive.expectedCost(1.0).joulesPerMinute.promotions, 0);
}

TEST(AdaptiveInterval, EveryIntervalInsideTheTailCostsTheRadioAlike) {
  // A 2 s target admits up to 9.85 s: every admissible push lands in the
  // previous one's tail, so the radio never sleeps and its energy per minute
  // hardly depends on the interval; the CPU of fewer harvests tips the
  // choice to the longest, which is what the bytes goal takes too.
  AdaptiveInterval energy(milliseconds(2'000), 1.0, 0);
  AdaptiveInterval bytes(milliseconds(2'000), 1.0, 0);
  energy.setGoal(IntervalGoal::energy, radioPowerModel("lte"));
  feed(energy);
  feed(bytes);
  EXPECT_NEAR(bytes.intervalSeconds(), 9.85, 0.01);
  EXPECT_NEAR(energy.intervalSeconds(), bytes.intervalSeconds(), 0.01);
  const double shortest = energy.expectedCost(0.2).joulesPerMinute.radio();
  const double longest = energy.expectedCost(9.85).joulesPerMinute.radio();
  EXPECT_NEAR(longest / shortest, 1.0, 0.01);
  EXPECT_LT(energy.expectedCost(9.85).joulesPerMinute.cpu, energy.expectedCost(0.2).joulesPerMinute.cpu);
}

TEST(AdaptiveInterval, TheEnergyChoiceKeepsTheTarget) {
  for (const auto& radio : radioPowerModels()) {
    for (int targetMs : {300, 1'000, 5'000, 20'000}) {
      AdaptiveInterval adaptive(milliseconds(targetMs), 1.0, 50'000);
      adaptive.setGoal(IntervalGoal::energy, radio);
      feed(adaptive);
      if (!adaptive.reachable()) continue;
      EXPECT_LE(adaptive.expectedFinalSeconds(), targetMs / 1000.0 + 1e-9) << radio.name << " " << targetMs;
      EXPECT_GE(adaptive.intervalSeconds(), 0.2) << radio.name << " " << targetMs;
    }
  }
}

TEST(AdaptiveInterval, TheEstimateCountsBytesAtTheGuestsRate) {
  AdaptiveInterval adaptive(milliseconds(1000), 1.0, 100'000);
  EXPECT_EQ(adaptive.expectedCost().bytesPerMinute, 0.0);  // nothing measured yet
  feed(adaptive);
  EXPECT_NEAR(adaptive.expectedCost().bytesPerMinute, 6'000'000, 1);
  EXPECT_GT(adaptive.expectedCost().joulesPerMinute.total(), 0);
}

TEST(AdaptiveInterval, GoalsByName) {
  EXPECT_EQ(parseIntervalGoal("energy"), IntervalGoal::energy);
  EXPECT_EQ(parseIntervalGoal("bytes"), IntervalGoal::bytes);
  EXPECT_THROW(parseIntervalGoal("battery"), Error);
}

}  // namespace
}  // namespace vmsync
