#include "test_support.h"

#include <fcntl.h>
#include <linux/loop.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>

#include "base/error.h"
#include "base/units.h"

namespace vmsync::bpftest {

bool requireAll() {
  const char* value = std::getenv("VMSYNC_REQUIRE_ALL");
  return value && std::string(value) == "1";
}

ScratchImage::ScratchImage(std::uint64_t bytes) : bytes_(bytes) {
  std::string pattern = (std::filesystem::temp_directory_path() / "vmsync-bpf-XXXXXX").string();
  if (!::mkdtemp(pattern.data())) throwLastErrno("cannot create a temporary directory");
  directory_ = pattern;
  path_ = directory_ + "/disk.img";
  int fd = ::open(path_.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) throwLastErrno(fmt::format("cannot create {}", path_));
  std::mt19937_64 random(42);
  std::vector<std::uint64_t> chunk((1 << 20) / sizeof(std::uint64_t));
  for (std::uint64_t done = 0; done < bytes; done += 1 << 20) {
    for (auto& word : chunk) word = random();
    if (::write(fd, chunk.data(), 1 << 20) != 1 << 20) {
      int saved = errno;
      ::close(fd);
      throwErrno(saved, fmt::format("cannot fill {}", path_));
    }
  }
  ::fsync(fd);
  ::close(fd);
}

ScratchImage::~ScratchImage() {
  std::error_code ignored;
  std::filesystem::remove_all(directory_, ignored);
}

std::vector<std::uint64_t> hashBlocks(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throwLastErrno(fmt::format("cannot open {}", path));
  std::vector<std::uint64_t> hashes;
  std::vector<char> buffer(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0) {
      int saved = errno;
      ::close(fd);
      throwErrno(saved, fmt::format("cannot read {}", path));
    }
    if (n == 0) break;
    for (ssize_t offset = 0; offset < n; offset += kUnitSize)
      hashes.push_back(
          XXH3_64bits(buffer.data() + offset,
                      std::min<std::size_t>(kUnitSize, static_cast<std::size_t>(n - offset))));
    if (static_cast<std::size_t>(n) % kUnitSize) break;  // a short tail
  }
  ::close(fd);
  return hashes;
}

int stopChild(pid_t pid) {
  ::kill(pid, SIGTERM);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

}  // namespace vmsync::bpftest
