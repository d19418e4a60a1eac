// copySparse copies every byte and keeps the holes; dataRanges finds them;
// private directories and files are their owner's alone.
#include "base/durable_file.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "test_env.h"

namespace vmsync {
namespace {

using testing::TempDir;

constexpr std::uint64_t kMiB = 1u << 20;

void writeAt(int fd, const std::string& bytes, std::uint64_t offset) {
  ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset)),
            static_cast<ssize_t>(bytes.size()));
}

std::uint64_t allocatedBytes(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

TEST(CopySparse, CopiesEveryByteAndKeepsTheHoles) {
  TempDir dir;
  const std::string from = dir / "disk.img", to = dir / "copy.img";
  // 8 MiB and 100 bytes: data at 4 KiB, 1 MiB of it at 3 MiB, and the last 100 bytes.
  const std::uint64_t size = 8 * kMiB + 100;
  int fd = ::open(from.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
  std::string mib(kMiB, '\0');
  for (std::size_t i = 0; i < mib.size(); ++i) mib[i] = static_cast<char>(i * 7 + 1);
  writeAt(fd, std::string(4096, 'a'), 4096);
  writeAt(fd, mib, 3 * kMiB);
  writeAt(fd, std::string(100, 'z'), 8 * kMiB);
  ASSERT_EQ(::fsync(fd), 0);
  const auto ranges = dataRanges(fd, size, SIZE_MAX);
  ::close(fd);
  // A copy replaces what was there, larger or not.
  {
    int old = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    ASSERT_GE(old, 0);
    writeAt(old, std::string(9 * kMiB, 'x'), 0);
    ::close(old);
  }
  copySparse(from, to);
  EXPECT_EQ(readWholeFile(to, 16 * kMiB), readWholeFile(from, 16 * kMiB));
  struct stat st {};
  ASSERT_EQ(::stat(to.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  if (ranges.size() == 1 && ranges[0].first == 0 && ranges[0].second == size)
    VMSYNC_SKIP_OR_FAIL("the file system under the test's directory reports no holes");
  std::uint64_t data = 0;
  for (auto [first, end] : ranges) {
    EXPECT_LT(first, end);
    data += end - first;
  }
  EXPECT_LT(data, 2 * kMiB) << "the source's holes were not found";
  EXPECT_LT(allocatedBytes(to), 2 * kMiB) << "the copy filled the holes in";
}

TEST(DataRanges, PastItsCapTheRestIsDataWhateverErrnoHeld) {
  TempDir dir;
  const std::string path = dir / "disk.img";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(4 * kMiB)), 0);
  writeAt(fd, std::string(4096, 'a'), 2 * kMiB);
  using Ranges = std::vector<std::pair<std::uint64_t, std::uint64_t>>;
  // A cap of one range: no seeking, the whole file may hold data. An errno
  // left over from some earlier call must not make it a hole.
  errno = ENXIO;
  EXPECT_EQ(dataRanges(fd, 4 * kMiB, 1), (Ranges{{0, 4 * kMiB}}));
  const Ranges all = dataRanges(fd, 4 * kMiB, SIZE_MAX);
  ::close(fd);
  ASSERT_FALSE(all.empty());
  EXPECT_LE(all.front().first, 2 * kMiB);
  EXPECT_GE(all.back().second, 2 * kMiB + 4096);
}

TEST(CopySparse, SaysWhichFileIsMissing) {
  TempDir dir;
  try {
    copySparse(dir / "absent.img", dir / "copy.img");
    FAIL() << "copied a file that does not exist";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("absent.img"), std::string::npos) << e.what();
  }
}

mode_t modeOf(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

TEST(MakePrivateDirectory, CreatesItAndNarrowsOneOpenToOthers) {
  TempDir dir;
  const mode_t before = ::umask(022);  // as a careless shell would have it
  makePrivateDirectory(dir / "new/nested");
  EXPECT_EQ(modeOf(dir / "new/nested"), 0700u);
  ASSERT_EQ(::mkdir((dir / "open").c_str(), 0755), 0);
  makePrivateDirectory(dir / "open");
  EXPECT_EQ(modeOf(dir / "open"), 0700u);
  // A shared directory (sticky, like /tmp) is left alone: only warned about.
  ASSERT_EQ(::mkdir((dir / "shared").c_str(), 0777), 0);
  ASSERT_EQ(::chmod((dir / "shared").c_str(), 01777), 0);
  makePrivateDirectory(dir / "shared");
  EXPECT_EQ(modeOf(dir / "shared"), 01777u);
  ::umask(before);
}

TEST(MakePrivateDirectory, SaysWhatIsInTheWay) {
  TempDir dir;
  const int fd = ::open((dir / "file").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ::close(fd);
  try {
    makePrivateDirectory(dir / "file");
    FAIL() << "a file was taken for a directory";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir / "file"), std::string::npos) << e.what();
  }
}

TEST(MakePrivateFile, NarrowsAnOpenFileAndIgnoresAMissingOne) {
  TempDir dir;
  const int fd = ::open((dir / "serial.log").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ::close(fd);
  ASSERT_EQ(::chmod((dir / "serial.log").c_str(), 0644), 0);
  EXPECT_NE(readableByOthers(dir / "serial.log", "the console"), "");
  makePrivateFile(dir / "serial.log");
  EXPECT_EQ(modeOf(dir / "serial.log"), 0600u);
  EXPECT_EQ(readableByOthers(dir / "serial.log", "the console"), "");
  makePrivateFile(dir / "absent");  // nothing to do, no error
  EXPECT_FALSE(std::filesystem::exists(dir / "absent"));
}

}  // namespace
}  // namespace vmsync
