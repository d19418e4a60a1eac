#include "base/recycled_memory.h"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstring>
#include <vector>

namespace vmsync {
namespace {

long minorFaults() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

using Buffer = std::vector<std::byte, RecyclingAllocator<std::byte>>;

// A checkpoint's buffers come back for the next one with their pages: writing
// them again costs no page faults.
TEST(RecycledMemory, AFreedBufferIsReusedWithItsPages) {
  if (!recycled::kEnabled) GTEST_SKIP() << "built with AddressSanitizer: buffers are not recycled";
  constexpr std::size_t kBytes = (48u << 20) + 12288;  // a size no other test leaves behind
  const std::byte* first;
  {
    Buffer buffer(kBytes);
    std::memset(buffer.data(), 1, kBytes);
    first = buffer.data();
  }
  EXPECT_GE(recycled::cachedBytes(), kBytes);
  Buffer again(kBytes - 4096);  // about the same size: the same buffer
  EXPECT_EQ(again.data(), first);
  const long before = minorFaults();
  std::memset(again.data(), 2, again.size());
  EXPECT_LT(minorFaults() - before, static_cast<long>(kBytes / 4096 / 8))
      << "its pages were faulted in again";
}

TEST(RecycledMemory, AMuchLargerBufferIsNotHandedOutForASmallOne) {
  if (!recycled::kEnabled) GTEST_SKIP() << "built with AddressSanitizer: buffers are not recycled";
  const std::byte* large;
  {
    Buffer buffer((96u << 20) + 20480);
    large = buffer.data();
  }
  Buffer small(4u << 20);
  EXPECT_NE(small.data(), large) << "a 4 MiB buffer took a kept one of 96 MiB";
  Buffer fits((60u << 20) + 4096);
  EXPECT_EQ(fits.data(), large);
}

TEST(RecycledMemory, SmallBuffersAndTheCacheStayBounded) {
  Buffer small(1000);
  std::memset(small.data(), 3, small.size());
  std::vector<Buffer> many;
  for (int i = 0; i < 12; ++i) many.emplace_back(40u << 20);
  many.clear();
  EXPECT_LE(recycled::cachedBytes(), recycled::kCacheBytes);
}

}  // namespace
}  // namespace vmsync
