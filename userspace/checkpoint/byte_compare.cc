#include "checkpoint/byte_compare.h"

#include <bit>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define VMSYNC_HAVE_AVX2_KERNEL 1
#endif

namespace vmsync {

namespace {

static_assert(std::endian::native == std::endian::little, "diff masks assume little-endian words");

/// Mask bits for the bytes [from, to) compared one at a time.
void diffMaskBytes(const std::byte* a, const std::byte* b, std::size_t from, std::size_t to, std::uint64_t* mask) {
  for (std::size_t i = from; i < to; ++i)
    if (a[i] != b[i]) mask[i / 64] |= std::uint64_t{1} << (i % 64);
}

/// One bit per byte of an 8-byte word: bit k set when byte k of `x` is non-zero.
inline std::uint64_t nonZeroBytes(std::uint64_t x) {
  constexpr std::uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL;
  // High bit of each byte: set when the byte is non-zero (no carry between bytes).
  std::uint64_t high = (((x & kLow7) + kLow7) | x) & ~kLow7;
  // Gather the eight high bits into the top byte, byte k to bit k.
  return ((high >> 7) * 0x0102040810204080ULL) >> 56;
}

void diffMaskPortable(const std::byte* a, const std::byte* b, std::size_t n, std::uint64_t* mask) {
  const std::size_t full = n / 64;
  for (std::size_t w = 0; w < full; ++w) {
    std::uint64_t bits = 0;
    for (std::size_t k = 0; k < 8; ++k) {
      std::uint64_t x, y;
      std::memcpy(&x, a + w * 64 + k * 8, 8);
      std::memcpy(&y, b + w * 64 + k * 8, 8);
      bits |= nonZeroBytes(x ^ y) << (k * 8);
    }
    mask[w] = bits;
  }
  if (full * 64 < n) {
    mask[full] = 0;
    diffMaskBytes(a, b, full * 64, n, mask);
  }
}

#ifdef VMSYNC_HAVE_AVX2_KERNEL
__attribute__((target("avx2"))) void diffMaskAvx2(const std::byte* a, const std::byte* b, std::size_t n,
                                                  std::uint64_t* mask) {
  const std::size_t full = n / 64;
  for (std::size_t w = 0; w < full; ++w) {
    const auto* pa = reinterpret_cast<const __m256i*>(a + w * 64);
    const auto* pb = reinterpret_cast<const __m256i*>(b + w * 64);
    __m256i eqLow = _mm256_cmpeq_epi8(_mm256_loadu_si256(pa), _mm256_loadu_si256(pb));
    __m256i eqHigh = _mm256_cmpeq_epi8(_mm256_loadu_si256(pa + 1), _mm256_loadu_si256(pb + 1));
    std::uint64_t equal = static_cast<std::uint32_t>(_mm256_movemask_epi8(eqLow)) |
                          (std::uint64_t{static_cast<std::uint32_t>(_mm256_movemask_epi8(eqHigh))} << 32);
    mask[w] = ~equal;
  }
  if (full * 64 < n) {
    mask[full] = 0;
    diffMaskBytes(a, b, full * 64, n, mask);
  }
}
#endif

CompareKernel probeBestKernel() {
  const char* portable = std::getenv("VMSYNC_PORTABLE_COMPARE");
  if (portable != nullptr && *portable != '\0' && *portable != '0') return CompareKernel::kPortable;
  if (compareKernelSupported(CompareKernel::kAvx2)) return CompareKernel::kAvx2;
  return CompareKernel::kPortable;
}

}  // namespace

bool compareKernelSupported(CompareKernel kernel) {
  switch (kernel) {
    case CompareKernel::kPortable:
      return true;
    case CompareKernel::kAvx2:
#ifdef VMSYNC_HAVE_AVX2_KERNEL
      return __builtin_cpu_supports("avx2");
#else
      return false;
#endif
  }
  return false;
}

CompareKernel bestCompareKernel() {
  static const CompareKernel best = probeBestKernel();
  return best;
}

std::string_view compareKernelName(CompareKernel kernel) {
  switch (kernel) {
    case CompareKernel::kPortable: return "portable";
    case CompareKernel::kAvx2: return "avx2";
  }
  return "unknown";
}

void diffMask(CompareKernel kernel, std::span<const std::byte> a, std::span<const std::byte> b,
              std::span<std::uint64_t> mask) {
#ifdef VMSYNC_HAVE_AVX2_KERNEL
  if (kernel == CompareKernel::kAvx2) return diffMaskAvx2(a.data(), b.data(), a.size(), mask.data());
#endif
  diffMaskPortable(a.data(), b.data(), a.size(), mask.data());
}

void diffMask(std::span<const std::byte> a, std::span<const std::byte> b, std::span<std::uint64_t> mask) {
  diffMask(bestCompareKernel(), a, b, mask);
}

}  // namespace vmsync
