// Byte-wise comparison of two buffers as a bit mask, the core of the XOR-diff
// encoder and of changedBytes(). One portable kernel (64-bit words) and one for
// AVX2, chosen once at run time from what the CPU supports.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace vmsync {

/// Implementations of diffMask(); all give the same mask for the same input.
enum class CompareKernel {
  kPortable,  // 64-bit words, any CPU
  kAvx2,      // 32-byte vectors (x86-64 with AVX2)
};

/// True when this CPU can run `kernel`.
bool compareKernelSupported(CompareKernel kernel);

/// The fastest kernel this CPU supports, probed once. Setting the environment
/// variable VMSYNC_PORTABLE_COMPARE=1 forces the portable one.
CompareKernel bestCompareKernel();

/// Short name of a kernel ("portable", "avx2"), for reports.
std::string_view compareKernelName(CompareKernel kernel);

/// Words of mask needed for `bytes` bytes.
inline constexpr std::size_t diffMaskWords(std::size_t bytes) { return (bytes + 63) / 64; }

/// Sets bit (i % 64) of mask[i / 64] when a[i] != b[i], for every i < a.size();
/// bits past the end are zero. `a` and `b` have the same size and `mask` has
/// diffMaskWords(a.size()) words. `kernel` must be supported.
void diffMask(CompareKernel kernel, std::span<const std::byte> a, std::span<const std::byte> b,
              std::span<std::uint64_t> mask);

/// diffMask() with bestCompareKernel().
void diffMask(std::span<const std::byte> a, std::span<const std::byte> b, std::span<std::uint64_t> mask);

}  // namespace vmsync
