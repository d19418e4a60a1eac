#include "checkpoint/byte_compare.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "checkpoint/chunk_codec.h"
#include "base/units.h"

namespace vmsync {
namespace {

/// The byte-at-a-time XOR-diff encoder the wire format was defined with; the
/// vectorized encoder must give exactly its bytes.
bool referenceEncode(std::span<const std::byte> current, std::span<const std::byte> reference, std::size_t limit,
                     std::vector<std::byte>& out) {
  auto put = [&](std::uint32_t value) {
    while (value >= 0x80) {
      out.push_back(static_cast<std::byte>((value & 0x7F) | 0x80));
      value >>= 7;
    }
    out.push_back(static_cast<std::byte>(value));
  };
  out.clear();
  const std::size_t n = current.size();
  std::size_t i = 0;
  while (i < n) {
    std::size_t same = i;
    while (same < n && current[same] == reference[same]) ++same;
    if (same == n) break;
    std::size_t diff = same;
    while (diff < n && current[diff] != reference[diff]) ++diff;
    put(static_cast<std::uint32_t>(same - i));
    put(static_cast<std::uint32_t>(diff - same));
    out.insert(out.end(), current.begin() + static_cast<std::ptrdiff_t>(same),
               current.begin() + static_cast<std::ptrdiff_t>(diff));
    if (out.size() > limit) return false;
    i = diff;
  }
  return true;
}

std::vector<CompareKernel> supportedKernels() {
  std::vector<CompareKernel> kernels;
  for (auto k : {CompareKernel::kPortable, CompareKernel::kAvx2})
    if (compareKernelSupported(k)) kernels.push_back(k);
  return kernels;
}

/// `ref` with about `permille` / 1000 of its bytes changed, plus the bytes at
/// `forced` (unit and word boundaries).
std::vector<std::byte> mutate(const std::vector<std::byte>& ref, std::uint32_t permille, std::mt19937& rng,
                              std::initializer_list<std::size_t> forced = {}) {
  auto cur = ref;
  for (auto& b : cur)
    if (rng() % 1000 < permille) b ^= static_cast<std::byte>(1 + rng() % 255);
  for (std::size_t i : forced)
    if (i < cur.size()) cur[i] = ~cur[i];
  return cur;
}

std::vector<std::byte> randomBytes(std::size_t n, std::mt19937& rng) {
  std::vector<std::byte> bytes(n);
  for (auto& b : bytes) b = static_cast<std::byte>(rng());
  return bytes;
}

TEST(ByteCompare, PortableKernelIsAlwaysThere) {
  EXPECT_TRUE(compareKernelSupported(CompareKernel::kPortable));
  EXPECT_TRUE(compareKernelSupported(bestCompareKernel()));
  // Without AVX2 the tests below compare the portable kernel with the byte loop only.
  RecordProperty("avx2", compareKernelSupported(CompareKernel::kAvx2) ? "yes" : "no");
}

TEST(ByteCompare, EveryKernelGivesTheByteByByteMaskForEverySizeAndBoundary) {
  std::mt19937 rng(11);
  for (std::size_t n : {0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 4095, 4096, 4097, 8192}) {
    auto a = randomBytes(n, rng);
    for (std::uint32_t permille : {0u, 1u, 100u, 500u, 999u, 1000u}) {
      auto b = mutate(a, permille, rng, {0, 31, 32, 63, 64, 65, n - 1});
      std::vector<std::uint64_t> expected(diffMaskWords(n));
      for (std::size_t i = 0; i < n; ++i)
        if (a[i] != b[i]) expected[i / 64] |= std::uint64_t{1} << (i % 64);
      for (auto kernel : supportedKernels()) {
        std::vector<std::uint64_t> mask(diffMaskWords(n), ~std::uint64_t{0});
        diffMask(kernel, a, b, mask);
        EXPECT_EQ(mask, expected) << compareKernelName(kernel) << " n=" << n << " permille=" << permille;
      }
    }
  }
}

TEST(ByteCompare, XorDiffIsByteIdenticalToTheReferenceEncoderOnRandomUnits) {
  std::mt19937 rng(12);
  for (int round = 0; round < 200; ++round) {
    auto ref = randomBytes(kUnitSize, rng);
    // Densities from a single byte to every byte; runs at the unit's edges and across words.
    const std::uint32_t permille = std::vector<std::uint32_t>{0, 1, 5, 20, 100, 300, 700, 1000}[round % 8];
    auto cur = mutate(ref, permille, rng,
                      round % 2 ? std::initializer_list<std::size_t>{0, 1, 63, 64, 4031, 4032, kUnitSize - 1}
                                : std::initializer_list<std::size_t>{});
    for (std::size_t limit : {kUnitSize - 1, 2 * kUnitSize, std::size_t{16}}) {
      std::vector<std::byte> expected;
      const bool fits = referenceEncode(cur, ref, limit, expected);
      for (auto kernel : supportedKernels()) {
        std::vector<std::byte> got;
        ASSERT_EQ(encodeXorDiff(cur, ref, limit, got, kernel), fits)
            << compareKernelName(kernel) << " round " << round << " limit " << limit;
        if (fits) {
          EXPECT_EQ(got, expected) << compareKernelName(kernel) << " round " << round;
        }
      }
    }
  }
}

TEST(ByteCompare, LongRunsAcrossWordsAndVarintsOfTwoBytes) {
  std::vector<std::byte> ref(kUnitSize), cur(kUnitSize);
  // One changed run from byte 130 to 3000: both lengths need two-byte varints.
  for (std::size_t i = 130; i < 3000; ++i) cur[i] = std::byte{1};
  std::vector<std::byte> expected;
  ASSERT_TRUE(referenceEncode(cur, ref, 2 * kUnitSize, expected));
  for (auto kernel : supportedKernels()) {
    std::vector<std::byte> got, out(kUnitSize);
    ASSERT_TRUE(encodeXorDiff(cur, ref, 2 * kUnitSize, got, kernel));
    EXPECT_EQ(got, expected);
    decodeXorDiff(got, ref, out);
    EXPECT_EQ(out, cur);
  }
}

TEST(ByteCompare, ChangedBytesCountsEveryDifferingByte) {
  std::mt19937 rng(13);
  auto ref = randomBytes(kUnitSize, rng);
  for (std::uint32_t permille : {0u, 3u, 250u, 1000u}) {
    auto cur = mutate(ref, permille, rng, {0, kUnitSize - 1});
    std::uint32_t expected = 0;
    for (std::size_t i = 0; i < kUnitSize; ++i) expected += cur[i] != ref[i];
    EXPECT_EQ(changedBytes(cur, ref), expected);
  }
}

}  // namespace
}  // namespace vmsync
