// The kmod page source's host-side parts: where QEMU's q35 puts guest RAM,
// and finding a VMM's VM fd. Attach and harvest need vmsync.ko and run in
// tests/kmod, inside Debian's kernel.
#include "harvest/kmod_page_source.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "base/error.h"
#include "kvm_test_env.h"
#include "mini_vmm.h"
#include "test_env.h"

namespace vmsync::testing {
namespace {

TEST(KmodPageSource, Q35KeepsSmallRamBelowFourGiB) {
  auto ranges = qemuQ35GfnRanges(384ull << 20);
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_EQ(ranges[0].firstGfn, 0u);
  EXPECT_EQ(ranges[0].pages, (384ull << 20) / 4096);
  EXPECT_EQ(ranges[0].firstUnit, 0u);
}

TEST(KmodPageSource, Q35PutsRamPastTheLowLimitAboveFourGiB) {
  // 3 GiB is past q35's 2.75 GiB: 2 GiB stay low, 1 GiB goes to 4 GiB.
  auto ranges = qemuQ35GfnRanges(3ull << 30);
  ASSERT_EQ(ranges.size(), 2u);
  EXPECT_EQ(ranges[0].pages, (2ull << 30) / 4096);
  EXPECT_EQ(ranges[1].firstGfn, (4ull << 30) / 4096);
  EXPECT_EQ(ranges[1].pages, (1ull << 30) / 4096);
  EXPECT_EQ(ranges[1].firstUnit, (2ull << 30) / 4096);
}

TEST(KmodPageSource, FindsTheVmFdOfAProcess) {
  VMSYNC_REQUIRE_KVM_HARNESS();
  EXPECT_EQ(findKvmVmFd(::getpid()), -1);
  MiniVmm vmm(0);
  EXPECT_EQ(findKvmVmFd(::getpid()), vmm.vmFd());
}

TEST(KmodPageSource, RefusesAProcessWithoutAVm) {
  try {
    KmodPageSource source(::getpid(), qemuQ35GfnRanges(4u << 20));
    FAIL() << "attached to a process with no VM";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no KVM VM"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace vmsync::testing
