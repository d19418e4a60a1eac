// The kvm-ring page source on this host's /dev/kvm, with the minimal VMM's
// guest: every round, as KVM's dirty_log_test checks, every page the guest
// wrote is reported, and no data page it did not write that round is.
#include <gtest/gtest.h>

#include "kvm_test_env.h"
#include "mini_vmm.h"
#include "test_env.h"

namespace vmsync::testing {
namespace {

TEST(KvmRing, EveryWrittenPageIsReportedEveryRoundAndNoOther) {
  VMSYNC_REQUIRE_KVM_HARNESS();
  // 512 entries: one round needs about 70, forty rounds without the resets would overflow it.
  MiniVmm vmm(512);
  // Outside the data pages, the guest's page tables (accessed/dirty bits) and
  // nothing else may show up: at most this many units per round.
  constexpr std::size_t kOtherPagesBound = 4;
  std::size_t reportedTotal = 0;
  for (int i = 0; i < 40; ++i) {
    const std::uint64_t round = vmm.runRound();
    ASSERT_EQ(round, static_cast<std::uint64_t>(i));
    DirtyUnits reported = vmm.ringSource().harvest();
    ASSERT_FALSE(reported.everything) << reported.rescanReason;
    std::set<std::uint64_t> set(reported.units.begin(), reported.units.end());
    const auto written = MiniVmm::pagesWrittenIn(round);
    for (auto page : written) {
      ASSERT_TRUE(set.count(page)) << "round " << round << ": page " << page << " was written but not reported";
      ASSERT_EQ(vmm.dataByte(page), static_cast<std::uint8_t>(round));
    }
    std::size_t others = 0;
    for (auto unit : set) {
      ASSERT_FALSE(MiniVmm::neverWritten(unit)) << "page " << unit << " is never written but was reported";
      const bool data = unit >= MiniVmm::kDataStart / 4096 && unit < MiniVmm::kDataStart / 4096 + MiniVmm::kDataPages;
      if (data) ASSERT_TRUE(written.count(unit)) << "round " << round << ": page " << unit << " reported, not written";
      else ++others;
    }
    ASSERT_LE(others, kOtherPagesBound) << "round " << round;
    reportedTotal += set.size();
  }
  std::printf("kvm-ring invariant: 40 rounds, %zu pages reported\n", reportedTotal);
}

}  // namespace
}  // namespace vmsync::testing
