// ImageFile writes units in any order and refuses one past the end, through
// io_uring where io_uring completes them inline, keeps a
// writable image's page cache in 4 KiB folios, and its prefetch and recache
// keep every byte.
#include "vmm/image_file.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/filter.h>
#include <linux/magic.h>
#include <linux/seccomp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "base/error.h"
#include "test_env.h"
#include "harvest/unit_hashes.h"
#include "base/units.h"

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

/// Sets VMSYNC_IMAGE_WRITES for as long as it lives, then puts back what was there.
class ImageWritesSetting {
 public:
  explicit ImageWritesSetting(const char* value) {
    if (const char* was = std::getenv(kName)) previous_ = was;
    ::setenv(kName, value, 1);
  }
  ~ImageWritesSetting() {
    if (previous_)
      ::setenv(kName, previous_->c_str(), 1);
    else
      ::unsetenv(kName);
  }

 private:
  static constexpr const char* kName = "VMSYNC_IMAGE_WRITES";
  std::optional<std::string> previous_;
};

/// Writes units 0, 2, 3, ... (not 1 or any multiple of 97) of `bytes`, in
/// reverse, into a new image at `path`; returns it once every unit reads
/// back as written, or as zeros where nothing was written.
std::unique_ptr<ImageFile> writeScattered(const std::string& path,
                                          const std::vector<std::byte>& bytes) {
  const std::uint64_t units = bytes.size() / kUnitSize;
  auto image = std::make_unique<ImageFile>(path, true, bytes.size());
  auto written = [](std::uint64_t i) { return i != 1 && i % 97 != 0; };
  std::vector<UnitWrite> writes;
  for (std::uint64_t i = 0; i < units; ++i)
    if (written(i)) writes.push_back({i, bytes.data() + i * kUnitSize});
  std::reverse(writes.begin(), writes.end());
  image->writeUnits(writes);
  const std::vector<std::byte> zeros(kUnitSize);
  for (std::uint64_t i = 0; i < units; ++i) {
    const std::byte* expected = written(i) ? bytes.data() + i * kUnitSize : zeros.data();
    EXPECT_EQ(std::memcmp(image->unit(i).data(), expected, kUnitSize), 0) << path << ": unit " << i;
  }
  return image;
}

TEST(ImageFile, WritesThroughIoUringOnAnyFileSystemWhenAskedTo) {
  TempDir dir;
  ImageWritesSetting ring("io_uring");
  // More writes than the ring has entries, so some wait for room.
  auto image = writeScattered(dir / "img", pattern(1000));
  EXPECT_EQ(image->writes(), ImageWrites::ring);
  // A second batch, from another thread: a ring takes submissions from the
  // thread that set it up only.
  const auto other = pattern(1001);
  std::vector<UnitWrite> writes{{5, other.data() + 1000 * kUnitSize},
                                {900, other.data() + 1000 * kUnitSize}};
  std::thread([&] { image->writeUnits(writes); }).join();
  for (std::uint64_t i : {5, 900})
    EXPECT_EQ(std::memcmp(image->unit(i).data(), other.data() + 1000 * kUnitSize, kUnitSize), 0)
        << "unit " << i;
}

TEST(ImageFile, AnUnknownWayOfWritingIsRefusedByName) {
  TempDir dir;
  ImageWritesSetting wrong("uring");
  try {
    ImageFile image(dir / "img", true, kUnitSize);
    FAIL() << "an image opened with VMSYNC_IMAGE_WRITES=uring";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("VMSYNC_IMAGE_WRITES is 'uring'"), std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "img"));
  // A read-only image writes nothing, so the setting is not its concern.
  std::ofstream(dir / "img").close();
  std::filesystem::resize_file(dir / "img", kUnitSize);
  ImageFile readOnly(dir / "img", false);
}

/// Caps the size of files this process writes, and ignores the SIGXFSZ a
/// write past it raises, for as long as it lives.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::getrlimit(RLIMIT_FSIZE, &saved_);
    previous_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit limit = saved_;
    limit.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &limit);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &saved_);
    std::signal(SIGXFSZ, previous_);
  }

 private:
  rlimit saved_{};
  void (*previous_)(int) = nullptr;
};

TEST(ImageFile, AFailedWriteNamesTheImageAndTheByteAndEveryWriteHasEnded) {
  for (const char* how : {"pwrite", "io_uring"}) {
    SCOPED_TRACE(how);
    TempDir dir;
    ImageWritesSetting setting(how);
    const auto bytes = pattern(300);
    ImageFile image(dir / "img", true, bytes.size());
    std::vector<UnitWrite> writes;
    for (std::uint64_t i = 0; i < 300; ++i) writes.push_back({i, bytes.data() + i * kUnitSize});
    std::string message;
    {
      // Units from 200 on are past what this process may write.
      FileSizeLimit limit(200 * kUnitSize);
      try {
        image.writeUnits(writes);
      } catch (const Error& e) {
        message = e.what();
      }
    }
    ASSERT_FALSE(message.empty()) << "writes past RLIMIT_FSIZE succeeded";
    EXPECT_NE(message.find("cannot write image " + dir / "img" + " at byte "), std::string::npos)
        << message;
    EXPECT_NE(message.find(std::strerror(EFBIG)), std::string::npos) << message;
    const std::size_t at = message.find(" at byte ");
    EXPECT_GE(std::stoull(message.substr(at + 9)), 200 * kUnitSize) << message;
    // Every write has ended (the buffers may go); those below the limit landed.
    for (std::uint64_t i = 0; i < 200; ++i)
      ASSERT_EQ(std::memcmp(image.unit(i).data(), bytes.data() + i * kUnitSize, kUnitSize), 0)
          << "unit " << i;
  }
}

/// The f_type of the file system `path` is on (linux/magic.h), 0 if unknown.
long fileSystemOf(const std::string& path) {
  struct statfs fs {};
  return ::statfs(path.c_str(), &fs) == 0 ? static_cast<long>(fs.f_type) : 0;
}

TEST(ImageFile, WritesThroughIoUringWhereItCompletesThemInline) {
  ImageWritesSetting automatic("auto");
  {
    // io_uring would hand every write on ext4 to a worker thread.
    TempDir dir;
    if (fileSystemOf(dir.path()) == EXT4_SUPER_MAGIC) {
      EXPECT_EQ(writeScattered(dir / "img", pattern(300))->writes(), ImageWrites::pwrite)
          << "on ext4";
    }
  }
  {
    // So would tmpfs.
    if (fileSystemOf("/dev/shm") == TMPFS_MAGIC) {
      const std::string path = "/dev/shm/vmsync-image-test-" + std::to_string(::getpid());
      EXPECT_EQ(writeScattered(path, pattern(300))->writes(), ImageWrites::pwrite) << "on tmpfs";
      std::filesystem::remove(path);
    }
  }
  TempDir dir;
  testing::LoopMount xfs("xfs", dir / "xfs");
  if (!xfs.missing().empty()) VMSYNC_SKIP_OR_FAIL(xfs.missing());
  ASSERT_EQ(fileSystemOf(xfs / ""), XFS_SUPER_MAGIC);
  auto image = writeScattered(xfs / "img", pattern(300));
  EXPECT_EQ(image->writes(), ImageWrites::ring) << "on XFS";
  image->sync();
  // What the ring wrote is in the file, not only in this process's view of it.
  image.reset();
  ImageFile again(xfs / "img", false);
  const auto bytes = pattern(300);
  EXPECT_EQ(std::memcmp(again.unit(299).data(), bytes.data() + 299 * kUnitSize, kUnitSize), 0);
}

TEST(ImageFile, WritesWithPwriteOnBtrfsWhichTakesNonBlockingWritesButNotInlineFromIoUring) {
  ImageWritesSetting automatic("auto");
  TempDir dir;
  testing::LoopMount btrfs("btrfs", dir / "btrfs");
  if (!btrfs.missing().empty()) VMSYNC_SKIP_OR_FAIL(btrfs.missing());
  EXPECT_EQ(writeScattered(btrfs / "img", pattern(300))->writes(), ImageWrites::pwrite)
      << "on btrfs";
}

/// Makes io_uring_setup fail with EPERM in this process from now on, as where
/// io_uring is turned off (kernel.io_uring_disabled). Returns false if it
/// cannot.
bool refuseIoUring() {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog program{static_cast<unsigned short>(std::size(filter)), filter};
  return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) == 0;
}

/// Runs `body` in a child process; returns what it printed on failure, or
/// nothing when it exited 0.
std::string inChild(const std::function<std::string()>& body) {
  int pipeFds[2];
  if (::pipe(pipeFds) != 0) return "pipe failed";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(pipeFds[0]);
    std::string failure;
    try {
      failure = body();
    } catch (const std::exception& e) {
      failure = std::string("threw: ") + e.what();
    }
    if (!failure.empty()) (void)!::write(pipeFds[1], failure.data(), failure.size());
    ::_exit(failure.empty() ? 0 : 1);
  }
  ::close(pipeFds[1]);
  std::string output;
  char buffer[512];
  for (ssize_t n; (n = ::read(pipeFds[0], buffer, sizeof buffer)) > 0;) output.append(buffer, n);
  ::close(pipeFds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status)) return "the child died: " + output;
  return WEXITSTATUS(status) == 0 ? "" : output;
}

TEST(ImageFile, WithoutIoUringAnImageLeftToChooseWritesWithPwriteAndOneToldToFails) {
  TempDir dir;
  testing::LoopMount xfs("xfs", dir / "xfs");
  if (!xfs.missing().empty()) VMSYNC_SKIP_OR_FAIL(xfs.missing());
  EXPECT_EQ(inChild([&]() -> std::string {
              if (!refuseIoUring()) return "cannot install a seccomp filter";
              ImageWritesSetting automatic("auto");
              auto image = writeScattered(xfs / "auto", pattern(300));
              if (::testing::Test::HasFailure()) return "units read back wrong";
              if (image->writes() != ImageWrites::pwrite) return "did not fall back to pwrite";
              return "";
            }),
            "");
  EXPECT_EQ(inChild([&]() -> std::string {
              if (!refuseIoUring()) return "cannot install a seccomp filter";
              ImageWritesSetting ring("io_uring");
              ImageFile image(xfs / "forced", true, 8 * kUnitSize);
              const std::vector<std::byte> unit(kUnitSize, std::byte{7});
              const std::vector<UnitWrite> writes{{1, unit.data()}, {5, unit.data()}};
              try {
                image.writeUnits(writes);
              } catch (const Error& e) {
                const std::string what = e.what();
                return what.find("cannot set up io_uring to write image " + xfs / "forced") !=
                               std::string::npos
                           ? ""
                           : "wrong error: " + what;
              }
              return "wrote with io_uring refused, though told to use it";
            }),
            "");
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
