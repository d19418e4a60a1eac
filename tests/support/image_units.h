// Units of an ImageFile for tests that build and apply checkpoints by hand.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "base/units.h"
#include "vmm/image_file.h"

namespace vmsync::testing {

/// A unit of random bytes.
inline std::vector<std::byte> randomUnit(std::mt19937& rng) {
  std::vector<std::byte> unit(kUnitSize);
  for (auto& b : unit) b = static_cast<std::byte>(rng());
  return unit;
}

/// A copy of unit `i` of `image`.
inline std::vector<std::byte> bytesOf(const ImageFile& image, std::uint64_t i) {
  return {image.unit(i).begin(), image.unit(i).end()};
}

}  // namespace vmsync::testing
