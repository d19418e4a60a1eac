#include "image_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "error.h"

namespace vmsync {

ImageFile::ImageFile(std::string path, bool writable, std::uint64_t createBytes)
    : path_(std::move(path)) {
  int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
  if (createBytes > 0) flags |= O_CREAT;
  fd_ = ::open(path_.c_str(), flags, 0600);
  if (fd_ < 0) throwLastErrno(fmt::format("cannot open image {}", path_));
  if (createBytes > 0 && ::ftruncate(fd_, static_cast<off_t>(createBytes)) != 0) {
    int err = errno;
    ::close(fd_);
    throwErrno(err, fmt::format("cannot size image {} to {} bytes", path_, createBytes));
  }
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    int err = errno;
    ::close(fd_);
    throwErrno(err, fmt::format("cannot stat image {}", path_));
  }
  size_ = static_cast<std::uint64_t>(st.st_size);
  if (S_ISBLK(st.st_mode)) {
    off_t end = ::lseek(fd_, 0, SEEK_END);
    if (end > 0) size_ = static_cast<std::uint64_t>(end);
  }
  if (size_ == 0 || size_ % kUnitSize != 0) {
    ::close(fd_);
    fail("image {} has size {} bytes, not a non-zero multiple of {}", path_, size_, kUnitSize);
  }
  void* map = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (map == MAP_FAILED) {
    int err = errno;
    ::close(fd_);
    throwErrno(err, fmt::format("cannot map image {}", path_));
  }
  base_ = static_cast<std::byte*>(map);
}

ImageFile::~ImageFile() {
  if (base_ != nullptr) ::munmap(base_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void ImageFile::writeUnit(std::uint64_t index, std::span<const std::byte> data) {
  if (index >= units()) fail("unit {} is past the end of image {} ({} units)", index, path_, units());
  if (data.size() != kUnitSize) fail("unit {} of {}: {} bytes, expected {}", index, path_, data.size(), kUnitSize);
  writeAt(data.data(), data.size(), index * kUnitSize);
}

void ImageFile::writeAt(const std::byte* data, std::size_t size, std::uint64_t offset) {
  for (std::size_t done = 0; done < size;) {
    ssize_t n = ::pwrite(fd_, data + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throwLastErrno(fmt::format("cannot write image {}", path_));
    }
    done += static_cast<std::size_t>(n);
  }
}

void ImageFile::writeUnits(std::span<const UnitWrite> writes) {
  for (const auto& write : writes)
    if (write.index >= units()) fail("unit {} is past the end of image {} ({} units)", write.index, path_, units());
  std::vector<UnitWrite> sorted(writes.begin(), writes.end());
  std::sort(sorted.begin(), sorted.end(), [](const UnitWrite& a, const UnitWrite& b) { return a.index < b.index; });
  constexpr std::size_t kMaxRun = std::min<std::size_t>(IOV_MAX, 256);
  std::vector<iovec> iov;
  iov.reserve(kMaxRun);
  for (std::size_t first = 0; first < sorted.size();) {
    // The run of consecutive units starting at `first`.
    std::size_t end = first + 1;
    while (end < sorted.size() && end - first < kMaxRun && sorted[end].index == sorted[end - 1].index + 1) ++end;
    iov.clear();
    for (std::size_t i = first; i < end; ++i)
      iov.push_back({const_cast<std::byte*>(sorted[i].bytes), kUnitSize});
    const std::size_t total = (end - first) * kUnitSize;
    const off_t offset = static_cast<off_t>(sorted[first].index * kUnitSize);
    ssize_t n;
    do n = ::pwritev(fd_, iov.data(), static_cast<int>(iov.size()), offset);
    while (n < 0 && errno == EINTR);
    if (n < 0) throwLastErrno(fmt::format("cannot write image {}", path_));
    // A short write: the rest unit by unit.
    for (std::size_t done = static_cast<std::size_t>(n); done < total;) {
      const std::size_t unit = done / kUnitSize, within = done % kUnitSize;
      writeAt(sorted[first + unit].bytes + within, kUnitSize - within, static_cast<std::uint64_t>(offset) + done);
      done += kUnitSize - within;
    }
    first = end;
  }
}

void ImageFile::sync() {
  if (::fdatasync(fd_) != 0) throwLastErrno(fmt::format("cannot sync image {}", path_));
}

}  // namespace vmsync
