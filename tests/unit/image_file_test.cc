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
  // The rest of the image (holes, never cached) comes in through prefetch.
  image.prefetch();
  touchAll(image);
  auto large = pagesInLargeFolios(image.bytes().data(), image.sizeBytes());
  if (!large) VMSYNC_SKIP_OR_FAIL("cannot read page frames and their flags (needs root)");
  EXPECT_EQ(*large, 0u) << "pages of the written image in large folios";
  for (const auto& write : writes)
    ASSERT_EQ(std::memcmp(image.unit(write.index).data(), write.bytes, kUnitSize), 0) << "unit " << write.index;
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
