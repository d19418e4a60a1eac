#include "vmm/image_file.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#include "base/durable_file.h"
#include "base/error.h"
#include "vmm/write_ring.h"

namespace vmsync {

ImageWrites imageWritesFromEnvironment() {
  const char* value = std::getenv("VMSYNC_IMAGE_WRITES");
  if (value == nullptr || std::string_view(value) == "auto") return ImageWrites::automatic;
  if (std::string_view(value) == "pwrite") return ImageWrites::pwrite;
  if (std::string_view(value) == "io_uring") return ImageWrites::ring;
  fail("VMSYNC_IMAGE_WRITES is '{}'; it takes auto, pwrite or io_uring", value);
}

ImageFile::ImageFile(std::string path, bool writable, std::uint64_t createBytes)
    : path_(std::move(path)), writable_(writable) {
  if (writable) writes_ = requested_ = imageWritesFromEnvironment();
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
  if (writable) {
    // Random access: a read of the fd caches the pages it asks for, a fault
    // the page it needs, each in a 4 KiB folio (see the class comment).
    int err = ::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
    if (err == 0 && ::madvise(base_, size_, MADV_RANDOM) != 0) err = errno;
    if (err != 0) {
      ::munmap(base_, size_);
      ::close(fd_);
      throwErrno(err, fmt::format("cannot set random access on image {}", path_));
    }
  }
}

ImageFile::~ImageFile() {
  ring_.reset();
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
      throwLastErrno(fmt::format("cannot write image {} at byte {}", path_, offset + done));
    }
    done += static_cast<std::size_t>(n);
  }
}

void ImageFile::writeUnits(std::span<const UnitWrite> writes) {
  for (const auto& write : writes)
    if (write.index >= units()) fail("unit {} is past the end of image {} ({} units)", write.index, path_, units());
  std::vector<UnitWrite> sorted(writes.begin(), writes.end());
  std::sort(sorted.begin(), sorted.end(), [](const UnitWrite& a, const UnitWrite& b) { return a.index < b.index; });
  std::span<const UnitWrite> rest(sorted);
  if (!probed_ && writes_ != ImageWrites::pwrite && !rest.empty()) {
    probed_ = true;
    rest = rest.subspan(probeWrites(rest));
  }
  if (rest.empty()) return;
  if (writes_ == ImageWrites::ring) {
    // A ring takes submissions from the thread that set it up only. It is
    // idle between calls, so another thread gets a ring of its own.
    if (ring_ && ring_->owner() != std::this_thread::get_id()) ring_.reset();
    if (!ring_) {
      try {
        ring_ = std::make_unique<WriteRing>(path_, /*punt=*/!inline_);
      } catch (const Error& e) {
        if (requested_ == ImageWrites::ring) throw;
        // Left to choose: io_uring may be turned off here (io_uring_disabled).
        spdlog::warn("{}; writing with pwrite instead", e.what());
        writes_ = ImageWrites::pwrite;
      }
    }
    if (ring_) {
      ring_->write(fd_, path_, rest);
      return;
    }
  }
  for (const auto& write : rest) writeAt(write.bytes, kUnitSize, write.index * kUnitSize);
}

std::size_t ImageFile::probeWrites(std::span<const UnitWrite> sorted) {
  // io_uring completes a buffered write inline only where the file system
  // allows it (FMODE_BUF_WASYNC), which user space cannot ask: XFS, since
  // Linux 6.0. btrfs takes RWF_NOWAIT writes, but io_uring still sent every
  // write to a worker there. So XFS, on a kernel that takes non-blocking
  // buffered writes on it: the first write goes with RWF_NOWAIT, and is
  // taken, or refused only because it would block (a hole to allocate, a
  // timestamp to update); a kernel before 6.0 refuses it with EOPNOTSUPP.
  struct statfs fs {};
  std::size_t done = 0;
  if (::fstatfs(fd_, &fs) == 0 && fs.f_type == XFS_SUPER_MAGIC) {
    const UnitWrite& first = sorted.front();
    const off_t offset = static_cast<off_t>(first.index * kUnitSize);
    iovec iov{const_cast<std::byte*>(first.bytes), kUnitSize};
    ssize_t n;
    do n = ::pwritev2(fd_, &iov, 1, offset, RWF_NOWAIT);
    while (n < 0 && errno == EINTR);
    if (n >= 0) {
      writeAt(first.bytes + n, kUnitSize - static_cast<std::size_t>(n), offset + n);
      done = 1;
    } else if (errno != EAGAIN && errno != EOPNOTSUPP && errno != EINVAL && errno != ENOSYS) {
      throwLastErrno(fmt::format("cannot write image {} at byte {}", path_, offset));
    }
    inline_ = n >= 0 || errno == EAGAIN;
  }
  if (writes_ == ImageWrites::automatic)
    writes_ = inline_ ? ImageWrites::ring : ImageWrites::pwrite;
  spdlog::info(
      "image {}: io_uring {}; writing {}", path_,
      inline_ ? "completes writes to it inline" : "would hand every write to it to a worker thread",
      writes_ == ImageWrites::ring ? "through io_uring" : "with pwrite");
  return done;
}

std::vector<UnitRun> ImageFile::dataRuns() const {
  std::vector<UnitRun> runs;
  for (auto [first, end] : dataRanges(fd_, size_, kMaxDataRuns)) {
    // Outward to whole units: a unit is skipped only if all of it is a hole.
    const UnitRun run{first / kUnitSize, (end + kUnitSize - 1) / kUnitSize};
    if (!runs.empty() && runs.back().end >= run.first)
      runs.back().end = std::max(runs.back().end, run.end);
    else
      runs.push_back(run);
  }
  return runs;
}

std::vector<UnitSpan> spansByHoles(const std::vector<UnitRun>& dataRuns, std::uint64_t units,
                                   std::uint64_t grain) {
  std::vector<UnitSpan> spans;
  auto add = [&](std::uint64_t first, std::uint64_t end, bool hole) {
    for (std::uint64_t at = first; at < end; at += grain)
      spans.push_back({at, std::min(at + grain, end), hole});
  };
  std::uint64_t next = 0;  // the first unit not yet in a span
  for (const UnitRun& run : dataRuns) {
    add(next, run.first, true);
    add(run.first, run.end, false);
    next = run.end;
  }
  add(next, units, true);
  return spans;
}

void ImageFile::prefetch(const std::vector<UnitRun>& runs) const {
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t pages = (size_ + page - 1) / page;
  std::vector<unsigned char> resident(pages);
  if (::mincore(base_, size_, resident.data()) != 0)
    throwLastErrno(fmt::format("cannot see which pages of image {} are cached", path_));
  constexpr std::size_t kMaxRead = 1u << 20;
  const std::size_t maxPages = std::max<std::size_t>(1, kMaxRead / page);
  auto scratch = std::make_unique_for_overwrite<std::byte[]>(maxPages * page);
  for (const UnitRun& run : runs) {
    // The pages that hold any byte of the run's units.
    const std::size_t endPage =
        std::min<std::uint64_t>((run.end * kUnitSize + page - 1) / page, pages);
    for (std::size_t first = run.first * kUnitSize / page; first < endPage;) {
      if (resident[first] & 1) {
        ++first;
        continue;
      }
      std::size_t end = first + 1;
      while (end < endPage && !(resident[end] & 1) && end - first < maxPages) ++end;
      const std::uint64_t offset = std::uint64_t{first} * page;
      readAt(scratch.get(),
             std::min<std::uint64_t>(std::uint64_t{end - first} * page, size_ - offset), offset);
      first = end;
    }
  }
}

void ImageFile::readAt(std::byte* into, std::size_t size, std::uint64_t offset) const {
  if (!readExactly(fd_, into, size, static_cast<off_t>(offset), "image " + path_))
    fail("image {} ends before byte {}, short of the {} bytes it had when opened", path_,
         offset + size, size_);
}

std::vector<std::byte> ImageFile::copyBytes() const {
  std::vector<std::byte> bytes(size_);
  for (const UnitRun& run : dataRuns())
    readAt(bytes.data() + run.first * kUnitSize, (run.end - run.first) * kUnitSize,
           run.first * kUnitSize);
  return bytes;
}

void ImageFile::recache() {
  if (!writable_) fail("image {} is open read-only; only a writable image is recached", path_);
  sync();
  // Unmap this process's pages first: the kernel drops no page that is mapped.
  // The mapping is shared and read-only, so nothing is lost.
  if (::madvise(base_, size_, MADV_DONTNEED) != 0)
    throwLastErrno(fmt::format("cannot unmap image {}", path_));
  if (int err = ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED); err != 0)
    throwErrno(err, fmt::format("cannot drop image {} from the page cache", path_));
  prefetch();
}

void ImageFile::sync() {
  if (::fdatasync(fd_) != 0) throwLastErrno(fmt::format("cannot sync image {}", path_));
}

}  // namespace vmsync
