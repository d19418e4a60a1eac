// Guest RAM and the guest disk are both arrays of 4096-byte units.
#pragma once

#include <cstddef>
#include <cstdint>

namespace vmsync {

/// Size of a guest page and of a disk block as vmsync tracks them.
inline constexpr std::size_t kUnitSize = 4096;

/// Number of units covering `bytes` (which must be a multiple of kUnitSize).
inline constexpr std::uint64_t unitCount(std::uint64_t bytes) { return bytes / kUnitSize; }

}  // namespace vmsync
