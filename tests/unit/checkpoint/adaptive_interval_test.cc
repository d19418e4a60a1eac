#include "checkpoint/adaptive_interval.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace vmsync
