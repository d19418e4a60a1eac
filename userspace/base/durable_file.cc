#include "base/durable_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <memory>

#include <spdlog/spdlog.h>

#include "base/error.h"

namespace vmsync {

namespace fs = std::filesystem;

void writeFileDurably(const std::string& path, const void* bytes, std::size_t size) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throwLastErrno(fmt::format("cannot create {}", tmp));
  const char* p = static_cast<const char*>(bytes);
  std::size_t done = 0;
  while (done < size) {
    ssize_t n = ::write(fd, p + done, size - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      throwErrno(err, fmt::format("cannot write {}", tmp));
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    throwErrno(err, fmt::format("cannot fsync {}", tmp));
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) throwLastErrno(fmt::format("cannot rename {} into place", tmp));
  syncParentDirectory(path);
}

void syncDirectory(const std::string& dir) {
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) throwLastErrno(fmt::format("cannot open directory {}", dir));
  int rc = ::fsync(dfd);
  int err = errno;
  ::close(dfd);
  if (rc != 0) throwErrno(err, fmt::format("cannot fsync directory {}", dir));
}

void syncParentDirectory(const std::string& path) {
  const std::string dir = fs::path(path).parent_path().string();
  syncDirectory(dir.empty() ? "." : dir);
}

std::string readWholeFile(const std::string& path, std::size_t maxBytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throwLastErrno(fmt::format("cannot open {}", path));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throwErrno(err, fmt::format("cannot stat {}", path));
  }
  if (static_cast<std::uint64_t>(st.st_size) > maxBytes) {
    ::close(fd);
    fail("{} has {} bytes, more than the {} allowed", path, st.st_size, maxBytes);
  }
  std::string out(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t done = 0;
  while (done < out.size()) {
    ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(done));
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      int err = n < 0 ? errno : EIO;
      ::close(fd);
      throwErrno(err, fmt::format("cannot read {}", path));
    }
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  return out;
}

bool readExactly(int fd, void* into, std::size_t size, off_t offset, const std::string& path) {
  std::size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, static_cast<char*>(into) + done, size - done,
                        offset + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throwLastErrno(fmt::format("cannot read {}", path));
    if (n == 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

std::vector<std::pair<std::uint64_t, std::uint64_t>> dataRanges(int fd, std::uint64_t size,
                                                                std::size_t maxRanges) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
  for (std::uint64_t from = 0; from < size;) {
    const bool enough = ranges.size() + 1 >= maxRanges;
    const off_t data = enough ? -1 : ::lseek(fd, static_cast<off_t>(from), SEEK_DATA);
    if (!enough && data < 0 && errno == ENXIO) break;  // only a hole from `from` to the end
    const off_t hole = data < 0 ? -1 : ::lseek(fd, data, SEEK_HOLE);
    if (data < 0 || hole < 0) {  // cannot tell (or enough ranges): the rest may all be data
      ranges.emplace_back(from, size);
      break;
    }
    const auto first = static_cast<std::uint64_t>(data);
    const auto end = std::min(static_cast<std::uint64_t>(hole), size);
    if (first >= end) break;  // data only past `size`
    ranges.emplace_back(first, end);
    from = end;
  }
  return ranges;
}

namespace {

/// Copies bytes [first, end) of `in` to the same place in `out`: in the kernel
/// where it can, else through a buffer.
void copyRange(int in, int out, std::uint64_t first, std::uint64_t end, const std::string& from,
               const std::string& to) {
  bool kernelCopy = true;
  std::unique_ptr<char[]> buffer;
  constexpr std::size_t kChunk = 1u << 20;
  for (std::uint64_t at = first; at < end;) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(end - at, kChunk));
    ssize_t n;
    if (kernelCopy) {
      off_t inOffset = static_cast<off_t>(at), outOffset = static_cast<off_t>(at);
      n = ::copy_file_range(in, &inOffset, out, &outOffset, want, 0);
      if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP)) {
        kernelCopy = false;  // not between these files: through the buffer
        continue;
      }
    } else {
      if (!buffer) buffer = std::make_unique<char[]>(kChunk);
      if (!readExactly(in, buffer.get(), want, static_cast<off_t>(at), from))
        fail("{} ended at byte {} while it was copied to {}", from, at, to);
      n = ::pwrite(out, buffer.get(), want, static_cast<off_t>(at));
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throwLastErrno(fmt::format("cannot copy {} to {} at byte {}", from, to, at));
    if (n == 0) fail("{} ended at byte {} while it was copied to {}", from, at, to);
    at += static_cast<std::uint64_t>(n);
  }
}

}  // namespace

void copySparse(const std::string& from, const std::string& to, bool durable) {
  int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) throwLastErrno(fmt::format("cannot open {}", from));
  int out = -1;
  try {
    struct stat st {};
    if (::fstat(in, &st) != 0) throwLastErrno(fmt::format("cannot stat {}", from));
    const auto size = static_cast<std::uint64_t>(st.st_size);
    // A new file: one that replaced `to` in place would change under any
    // process that has the old one open or mapped.
    if (::unlink(to.c_str()) != 0 && errno != ENOENT)
      throwLastErrno(fmt::format("cannot replace {}", to));
    out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (out < 0) throwLastErrno(fmt::format("cannot create {}", to));
    if (::ftruncate(out, static_cast<off_t>(size)) != 0)
      throwLastErrno(fmt::format("cannot size {} to {} bytes", to, size));
    for (auto [first, end] : dataRanges(in, size, SIZE_MAX))
      copyRange(in, out, first, end, from, to);
    if (durable && ::fsync(out) != 0) throwLastErrno(fmt::format("cannot fsync {}", to));
  } catch (...) {
    ::close(in);
    if (out >= 0) ::close(out);
    throw;
  }
  ::close(in);
  if (::close(out) != 0) throwLastErrno(fmt::format("cannot write {}", to));
  if (durable) syncParentDirectory(to);
}

void makePrivateDirectory(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("cannot create directory {}: {}", dir, ec.message());
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) throwLastErrno(fmt::format("cannot stat {}", dir));
  if (!S_ISDIR(st.st_mode)) fail("{} is not a directory", dir);
  const mode_t mode = st.st_mode & 07777;
  if ((mode & 077) == 0) return;
  if ((mode & S_ISVTX) != 0 || st.st_uid != ::geteuid()) {
    spdlog::warn("{} (mode {:04o}) can be read by other users, and is shared or not ours to change: keep guest data "
                 "and keys in a directory of their own", dir, mode);
    return;
  }
  if (::chmod(dir.c_str(), 0700) != 0) throwLastErrno(fmt::format("cannot make {} private (mode 0700)", dir));
  spdlog::warn("{} was mode {:04o}, open to other users; it holds guest data or keys and is now 0700", dir, mode);
}

void makePrivateFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    throwLastErrno(fmt::format("cannot stat {}", path));
  }
  const mode_t mode = st.st_mode & 07777;
  if ((mode & 077) == 0) return;
  if (::chmod(path.c_str(), 0600) != 0) throwLastErrno(fmt::format("cannot make {} private (mode 0600)", path));
  spdlog::warn("{} was mode {:04o}, open to other users; it is now 0600", path, mode);
}

std::string readableByOthers(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || (st.st_mode & 077) == 0) return {};
  return fmt::format("{} holds {} and is mode {:04o}: other users may read it; `chmod 600 {}`", path, what,
                     st.st_mode & 07777, path);
}

}  // namespace vmsync
