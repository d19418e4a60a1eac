// An io_uring ring that writes an image's units, many per submission.
#pragma once

#include <liburing.h>

#include <span>
#include <string>
#include <thread>

#include "vmm/image_file.h"

namespace vmsync {

/// Writes units of one file through io_uring: up to kEntries in flight, all
/// that are ready in one submission, one 4 KiB write each (see ImageFile on
/// why units are not merged into longer writes).
///
/// Where the file system lets io_uring complete buffered writes inline (XFS),
/// a write completes inside the submission, so a batch of units costs one
/// system call. Elsewhere (ext4, tmpfs, btrfs) io_uring hands every write to a
/// worker thread; `punt` then sends it there at once (IOSQE_ASYNC), which
/// measured cheaper than trying inline first.
class WriteRing {
 public:
  static constexpr unsigned kEntries = 128;

  /// Sets up a ring. Throws Error naming `path` (the file it is for) when
  /// io_uring cannot be set up here.
  WriteRing(const std::string& path, bool punt);
  ~WriteRing();
  WriteRing(const WriteRing&) = delete;
  WriteRing& operator=(const WriteRing&) = delete;

  /// The thread that set the ring up: the only one that may submit to it.
  std::thread::id owner() const { return owner_; }

  /// Writes kUnitSize bytes of every unit of `writes` at its index in `fd`,
  /// in the order given. Returns, or throws Error naming `path` and the byte
  /// where the first failed write started, only once no write is in flight:
  /// the caller's buffers are free again either way. A unit whose write
  /// failed, and those after the failure not yet submitted, may not be
  /// written; others are.
  void write(int fd, const std::string& path, std::span<const UnitWrite> writes);

 private:
  io_uring ring_{};
  bool punt_ = false;
  std::thread::id owner_;
};

}  // namespace vmsync
