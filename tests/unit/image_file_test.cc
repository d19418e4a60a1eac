// ImageFile writes units in any order and refuses one past the end, keeps a
// writable image's page cache in 4 KiB folios, and its prefetch and recache
// keep every byte.
#include "image_file.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "error.h"
#include "test_env.h"
#include "unit_hashes.h"
#include "units.h"

namespace vmsync {
namespace {

using testing::TempDir;

constexpr std::size_t kImageUnits = 4096;  // 16 MiB: room for 2 MiB folios
constexpr int kKpfCompoundHead = 15;        // include/uapi/linux/kernel-page-flags.h
constexpr int kKpfCompoundTail = 16;

/// How many of the pages mapped at [addr, addr + bytes) belong to a folio of
/// more than one page, or nothing when this process cannot see page frames
/// (reading them takes CAP_SYS_ADMIN). Every page must be mapped.
std::optional<std::size_t> pagesInLargeFolios(const std::byte* addr, std::size_t bytes) {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  constexpr std::uint64_t kFrameMask = (std::uint64_t{1} << 55) - 1;  // pagemap: bits 0-54, bit 63 present
  constexpr std::uint64_t kLarge = (std::uint64_t{1} << kKpfCompoundHead) | (std::uint64_t{1} << kKpfCompoundTail);
  int pagemap = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  int kpageflags = ::open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
  std::optional<std::size_t> large;
  if (pagemap >= 0 && kpageflags >= 0) large = 0;
  for (std::size_t offset = 0; large && offset < bytes; offset += page) {
    const auto virtualPage = reinterpret_cast<std::uintptr_t>(addr + offset) / page;
    std::uint64_t entry = 0, flags = 0;
    if (::pread(pagemap, &entry, sizeof entry, static_cast<off_t>(virtualPage * sizeof entry)) != sizeof entry ||
        !(entry >> 63) || (entry & kFrameMask) == 0 ||
        ::pread(kpageflags, &flags, sizeof flags, static_cast<off_t>((entry & kFrameMask) * sizeof flags)) !=
            sizeof flags)
      large.reset();
    else if (flags & kLarge)
      ++*large;
  }
  if (pagemap >= 0) ::close(pagemap);
  if (kpageflags >= 0) ::close(kpageflags);
  return large;
}

/// Reads one byte of every page of `image` through its mapping, so every page is mapped.
void touchAll(const ImageFile& image) {
  for (std::uint64_t i = 0; i < image.units(); ++i) {
    [[maybe_unused]] volatile std::byte first = *static_cast<const volatile std::byte*>(image.unit(i).data());
  }
}

std::vector<std::byte> pattern(std::size_t units) {
  std::vector<std::byte> bytes(units * kUnitSize);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>((i * 131 + i / kUnitSize) % 251);
  return bytes;
}

/// Writes `bytes` to a new file at `path` in 1 MiB writes, syncs it, drops it
/// from the page cache and reads it back sequentially: what a copy, a plain
/// read or a VMM's faults leave in the page cache.
void writeAndReadSequentially(const std::string& path, const std::vector<std::byte>& bytes) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  constexpr std::size_t kChunk = 1u << 20;
  for (std::size_t offset = 0; offset < bytes.size(); offset += kChunk)
    ASSERT_EQ(::pwrite(fd, bytes.data() + offset, kChunk, static_cast<off_t>(offset)), static_cast<ssize_t>(kChunk));
  ASSERT_EQ(::fdatasync(fd), 0);
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  std::vector<std::byte> scratch(kChunk);
  for (std::size_t offset = 0; offset < bytes.size(); offset += kChunk)
    ASSERT_EQ(::pread(fd, scratch.data(), kChunk, static_cast<off_t>(offset)), static_cast<ssize_t>(kChunk));
  ::close(fd);
}

TEST(ImageFile, WriteUnitsInAnyOrderWithRunsAndRefusesAnIndexPastTheEnd) {
  TempDir dir;
  ImageFile image(dir / "img", true, 600 * kUnitSize);
  std::vector<std::vector<std::byte>> data(600);
  std::vector<UnitWrite> writes;
  // Runs, gaps and single units, given in reverse.
  for (std::uint64_t i = 0; i < 600; ++i) {
    if (i % 100 == 50 || (i > 400 && i % 3 == 0)) continue;
    data[i].assign(kUnitSize, static_cast<std::byte>(i % 251 + 1));
    writes.push_back({i, data[i].data()});
  }
  std::reverse(writes.begin(), writes.end());
  image.writeUnits(writes);
  for (std::uint64_t i = 0; i < 600; ++i) {
    if (data[i].empty())
      EXPECT_EQ(hashUnit(image.unit(i)), zeroUnitHash()) << "unit " << i;
    else
      EXPECT_TRUE(std::equal(image.unit(i).begin(), image.unit(i).end(), data[i].begin()))
          << "unit " << i;
  }
  std::vector<std::byte> other(kUnitSize, std::byte{0xEE});
  std::vector<UnitWrite> pastEnd{{1, other.data()}, {600, other.data()}};
  EXPECT_THROW(image.writeUnits(pastEnd), Error);
  EXPECT_FALSE(std::equal(image.unit(1).begin(), image.unit(1).end(), other.begin()))
      << "unit 1 was written";
}

TEST(ImageFile, RecacheLeavesNoLargeFolioAndEveryByte) {
  TempDir dir;
  const std::string path = dir / "ram.img";
  const auto bytes = pattern(kImageUnits);
  writeAndReadSequentially(path, bytes);
  {
    ImageFile readOnly(path, false);
    touchAll(readOnly);
    auto before = pagesInLargeFolios(readOnly.bytes().data(), readOnly.sizeBytes());
    if (!before) VMSYNC_SKIP_OR_FAIL("cannot read page frames and their flags (needs root)");
    if (*before == 0)
      GTEST_SKIP() << "this kernel cached a sequentially read file in 4 KiB folios only; there is nothing to recache";
  }
  ImageFile image(path, true);
  image.recache();
  touchAll(image);
  auto after = pagesInLargeFolios(image.bytes().data(), image.sizeBytes());
  ASSERT_TRUE(after);
  EXPECT_EQ(*after, 0u) << "pages of the recached image in large folios";
  EXPECT_EQ(std::memcmp(image.bytes().data(), bytes.data(), bytes.size()), 0);
}

TEST(ImageFile, UnitWritesAndPrefetchCacheNoLargeFolio) {
  TempDir dir;
  const auto bytes = pattern(kImageUnits);
  ImageFile image(dir / "ram.img", true, bytes.size());
  // Runs of 256 units and single units, into a file nothing has cached.
  std::vector<UnitWrite> writes;
  for (std::uint64_t i = 0; i < kImageUnits; ++i)
    if (i < 2048 || i % 7 == 0) writes.push_back({i, bytes.data() + i * kUnitSize});
  image.writeUnits(writes);
  image.sync();
  // Holes: prefetch leaves them, the mapping faults them in a page at a time.
  image.prefetch();
  touchAll(image);
  auto large = pagesInLargeFolios(image.bytes().data(), image.sizeBytes());
  if (!large) VMSYNC_SKIP_OR_FAIL("cannot read page frames and their flags (needs root)");
  EXPECT_EQ(*large, 0u) << "pages of the written image in large folios";
  for (const auto& write : writes)
    ASSERT_EQ(std::memcmp(image.unit(write.index).data(), write.bytes, kUnitSize), 0) << "unit " << write.index;
}

/// A sparse 8 MiB image: data at units 3, 1000-1099 and 2047, and unit 1500
/// written with zeros (data, not a hole); the rest never written.
constexpr std::uint64_t kSparseUnits = 2048;
constexpr std::uint64_t kWrittenZeros = 1500;

std::vector<UnitWrite> sparseWrites(const std::vector<std::byte>& bytes,
                                    const std::vector<std::byte>& zeros) {
  std::vector<UnitWrite> writes{{3, bytes.data() + 3 * kUnitSize}, {kWrittenZeros, zeros.data()}};
  for (std::uint64_t i = 1000; i < 1100; ++i) writes.push_back({i, bytes.data() + i * kUnitSize});
  writes.push_back({kSparseUnits - 1, bytes.data() + (kSparseUnits - 1) * kUnitSize});
  return writes;
}

bool inRuns(const std::vector<UnitRun>& runs, std::uint64_t index) {
  return std::any_of(runs.begin(), runs.end(),
                     [&](const UnitRun& r) { return r.first <= index && index < r.end; });
}

/// A sparse image of kSparseUnits units with sparseWrites() written, not synced.
struct SparseImage {
  TempDir dir;
  std::vector<std::byte> bytes = pattern(kSparseUnits);
  std::vector<std::byte> zeros = std::vector<std::byte>(kUnitSize);
  ImageFile image{dir / "ram.img", true, kSparseUnits* kUnitSize};
  std::vector<UnitWrite> writes = sparseWrites(bytes, zeros);
  SparseImage() { image.writeUnits(writes); }
};

TEST(ImageFile, HashesOfASparseImageAreThoseOfEveryUnitRead) {
  SparseImage sparse;
  ImageFile& image = sparse.image;
  const auto& writes = sparse.writes;
  // Before the sync the written units are only in the page cache (delayed
  // allocation on ext4); after it, in the file's extents.
  for (bool synced : {false, true}) {
    if (synced) image.sync();
    const auto runs = image.dataRuns();
    for (std::size_t k = 0; k < runs.size(); ++k) {
      EXPECT_LT(runs[k].first, runs[k].end) << "run " << k;
      EXPECT_LE(runs[k].end, kSparseUnits) << "run " << k;
      if (k > 0) {
        EXPECT_LT(runs[k - 1].end, runs[k].first) << "runs " << k - 1 << " and " << k;
      }
    }
    for (const auto& write : writes)
      EXPECT_TRUE(inRuns(runs, write.index)) << "unit " << write.index;
    const auto hashes = hashAllUnits(image);
    ASSERT_EQ(hashes.size(), kSparseUnits);
    for (std::uint64_t i = 0; i < kSparseUnits; ++i)
      ASSERT_EQ(hashes[i], hashUnit(image.unit(i))) << "unit " << i << (synced ? ", synced" : "");
    const auto copy = image.copyBytes();
    ASSERT_EQ(copy.size(), image.sizeBytes());
    EXPECT_EQ(std::memcmp(copy.data(), image.bytes().data(), copy.size()), 0)
        << (synced ? "synced" : "");
  }
}

TEST(ImageFile, ManySmallHolesEndInOneRunOfData) {
  TempDir dir;
  constexpr std::uint64_t kUnits = 2 * ImageFile::kMaxDataRuns + 200;
  const std::vector<std::byte> bytes(kUnitSize, std::byte{7});
  ImageFile image(dir / "ram.img", true, kUnits * kUnitSize);
  std::vector<UnitWrite> writes;
  for (std::uint64_t i = 0; i < kUnits; i += 2) writes.push_back({i, bytes.data()});
  image.writeUnits(writes);
  image.sync();
  const auto runs = image.dataRuns();
  if (runs.size() == 1 && runs[0].first == 0 && runs[0].end == kUnits)
    VMSYNC_SKIP_OR_FAIL("the file system under the test's directory reports no holes");
  // Seeking stops at the cap; the rest of the image is one run.
  ASSERT_LE(runs.size(), ImageFile::kMaxDataRuns);
  EXPECT_GE(runs.size(), ImageFile::kMaxDataRuns - 1);
  EXPECT_EQ(runs[0].first, 0u);
  EXPECT_EQ(runs[0].end, 1u);
  EXPECT_EQ(runs.back().end, kUnits);
  EXPECT_GT(runs.back().end - runs.back().first, 200u);
  for (const auto& write : writes) ASSERT_TRUE(inRuns(runs, write.index)) << "unit " << write.index;
}

TEST(ImageFile, HolesAreNeitherReadNorCached) {
  SparseImage sparse;
  ImageFile& image = sparse.image;
  const auto& writes = sparse.writes;
  image.recache();  // out to the file, dropped, and what may hold data read back
  const auto runs = image.dataRuns();
  if (inRuns(runs, 500) && inRuns(runs, 1800))
    VMSYNC_SKIP_OR_FAIL("the file system under the test's directory reports no holes");
  const auto hashes = hashAllUnits(image);
  const auto copy = image.copyBytes();
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident((image.sizeBytes() + page - 1) / page);
  ASSERT_EQ(
      ::mincore(const_cast<std::byte*>(image.bytes().data()), image.sizeBytes(), resident.data()),
      0)
      << std::strerror(errno);
  auto cached = [&](std::uint64_t unit) { return (resident[unit * kUnitSize / page] & 1) != 0; };
  for (const auto& write : writes)
    EXPECT_TRUE(cached(write.index)) << "unit " << write.index << " was not read";
  for (std::uint64_t unit : {0, 500, 999, 1100, 1800, 2046})
    if (!inRuns(runs, unit)) {
      EXPECT_FALSE(cached(unit)) << "unit " << unit << " is in a hole but was read";
    }
  EXPECT_EQ(hashes[500], zeroUnitHash());
  EXPECT_EQ(hashes[kWrittenZeros], zeroUnitHash());
  EXPECT_EQ(hashes[3], hashUnit(std::span(sparse.bytes.data() + 3 * kUnitSize, kUnitSize)));
  EXPECT_EQ(
      std::memcmp(copy.data() + 3 * kUnitSize, sparse.bytes.data() + 3 * kUnitSize, kUnitSize), 0);
}

TEST(ImageFile, PrefetchAndRecacheKeepWhatWasWrittenButNotSynced) {
  TempDir dir;
  const auto bytes = pattern(64);
  ImageFile image(dir / "disk.img", true, bytes.size());
  std::vector<UnitWrite> writes;
  for (std::uint64_t i = 0; i < 64; i += 3) writes.push_back({i, bytes.data() + i * kUnitSize});
  image.writeUnits(writes);
  image.prefetch();
  image.recache();  // writes the dirty pages out before it drops any
  for (std::uint64_t i = 0; i < 64; ++i) {
    std::vector<std::byte> expected(kUnitSize);
    if (i % 3 == 0) std::memcpy(expected.data(), bytes.data() + i * kUnitSize, kUnitSize);
    ASSERT_EQ(std::memcmp(image.unit(i).data(), expected.data(), kUnitSize), 0) << "unit " << i;
  }
  ImageFile readOnly(dir / "disk.img", false);
  EXPECT_THROW(readOnly.recache(), Error);
}

}  // namespace
}  // namespace vmsync
