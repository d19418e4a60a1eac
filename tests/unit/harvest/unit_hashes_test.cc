#include "harvest/unit_hashes.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "base/units.h"

namespace vmsync {
namespace {

// The hash is part of the image digest and of every tracker's state: the build
// chosen for this CPU must give the library's value for every input.
TEST(UnitHashes, CpuSpecificBuildGivesTheLibraryHash) {
  std::mt19937 rng(21);
  std::vector<std::byte> unit(kUnitSize);
  for (int round = 0; round < 64; ++round) {
    for (auto& b : unit) b = static_cast<std::byte>(round % 4 == 0 ? 0 : rng() % (round % 7 + 1));
    EXPECT_EQ(hashUnit(unit), hashUnitPortable(unit)) << "round " << round;
  }
  std::vector<std::byte> zero(kUnitSize);
  EXPECT_EQ(hashUnit(zero), zeroUnitHash());
  EXPECT_EQ(hashUnitPortable(zero), zeroUnitHash());
}

}  // namespace
}  // namespace vmsync
