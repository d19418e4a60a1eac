// A guest image file (RAM file or raw disk) seen as an array of 4096-byte units.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/units.h"

namespace vmsync {

/// One unit to write: which, and its kUnitSize bytes.
struct UnitWrite {
  std::uint64_t index = 0;
  const std::byte* bytes = nullptr;
};

/// Units [first, end) of an image.
struct UnitRun {
  std::uint64_t first = 0;
  std::uint64_t end = 0;
};

/// Units [first, end) of an image, all of them in a hole of the file or all
/// of them possibly holding data.
struct UnitSpan {
  std::uint64_t first = 0;
  std::uint64_t end = 0;
  bool hole = false;
};

/// How a writable image's writeUnits() reaches the file.
enum class ImageWrites {
  /// Through io_uring where it completes buffered writes inline, one pwrite
  /// per unit elsewhere (decided at the first writeUnits).
  automatic,
  /// One pwrite per unit.
  pwrite,
  /// Through io_uring, on any file system.
  ring,
};

/// What VMSYNC_IMAGE_WRITES asks for: "auto" (or unset), "pwrite" or
/// "io_uring". Throws Error naming the variable and its value otherwise.
ImageWrites imageWritesFromEnvironment();

class WriteRing;

/// Every unit of an image of `units` units in index order, cut into spans of
/// at most `grain` units that are all in `dataRuns` or all outside them.
std::vector<UnitSpan> spansByHoles(const std::vector<UnitRun>& dataRuns, std::uint64_t units,
                                   std::uint64_t grain);

/// An open image file mapped shared, so reads see what the VMM writes with no
/// copy through the VMM. Writes go through pwrite so the page cache stays the one
/// authority for the mapping, the VMM and the file.
///
/// A writable image takes its writes a unit at a time, scattered (a standby's
/// checkpoints), so it keeps its page cache in 4 KiB folios. Where the kernel
/// caches files in large folios (ext4 since Linux 6.16), a 4 KiB write into a
/// large folio costs time in proportion to the folio: the buffer heads of the
/// whole folio are walked on every write and again at writeback. On a build
/// machine a 4 KiB write cost 1.7 us into a 4 KiB folio, 8 us into a 1 MiB
/// folio and 17 us into a 2 MiB one. The kernel makes a large folio when a
/// write or a read spans more than one page of a range it has not cached, so a
/// writable image reads in random-access mode (fd and mapping), which caches
/// exactly the pages asked for, in 4 KiB folios, and writes one unit per
/// write.
///
/// Those writes go through io_uring, many per system call, where io_uring
/// completes buffered writes inline (XFS). Elsewhere (ext4, tmpfs, btrfs)
/// io_uring hands each write to a worker thread, which cost 40 % more CPU
/// than a pwrite per unit on ext4 and 66 % more on btrfs on a build machine,
/// so the writes are pwrites there. VMSYNC_IMAGE_WRITES forces either.
class ImageFile {
 public:
  /// Opens `path`; with `createBytes` > 0 the file is created (or resized) sparse
  /// to that size first. `writable` allows write()/sync(); writeUnits() then
  /// writes as VMSYNC_IMAGE_WRITES says (imageWritesFromEnvironment()).
  ImageFile(std::string path, bool writable, std::uint64_t createBytes = 0);
  ~ImageFile();
  ImageFile(const ImageFile&) = delete;
  ImageFile& operator=(const ImageFile&) = delete;

  const std::string& path() const { return path_; }
  std::uint64_t sizeBytes() const { return size_; }
  std::uint64_t units() const { return size_ / kUnitSize; }

  /// The bytes of unit `index`, read through the shared mapping.
  std::span<const std::byte> unit(std::uint64_t index) const {
    return {base_ + index * kUnitSize, kUnitSize};
  }
  /// The whole mapping.
  std::span<const std::byte> bytes() const { return {base_, size_}; }

  /// Writes one unit. Throws Error naming the file on failure.
  void writeUnit(std::uint64_t index, std::span<const std::byte> data);
  /// Writes many units, each index at most once, in any order, in index order
  /// and one write each (a write spanning uncached units would cache them in
  /// one large folio), by the means writes() says. Checks every index before
  /// writing anything. Throws Error naming the file and the byte on failure;
  /// some of the units may be written then.
  void writeUnits(std::span<const UnitWrite> writes);
  /// How writeUnits() writes: pwrite or ring, or automatic until the first
  /// writeUnits() of an image left to choose has found out.
  ImageWrites writes() const { return writes_; }
  /// Flushes written data to stable storage.
  void sync();

  /// The runs of units that may hold data, in index order. Every unit outside
  /// them lies in a hole of the file and reads as zeros, so a pass over the
  /// whole image need not read it (nor cache a page of zeros for it). Found
  /// with SEEK_DATA / SEEK_HOLE; where the file system cannot tell, and for a
  /// block device, one run covers the image. After kMaxDataRuns runs the rest
  /// of the image is one run, which bounds the system calls for a file of many
  /// small holes (seeking past a one-unit hole costs about what reading it
  /// does). Taken while another process writes the file, it is as fuzzy as a
  /// read of the file would be.
  std::vector<UnitRun> dataRuns() const;
  static constexpr std::size_t kMaxDataRuns = 4096;

  /// Brings every page of `runs` that is not in the page cache in through the
  /// file descriptor, up to 1 MiB per read. Call it before a pass over those
  /// units of the mapping: a writable image's mapping faults one page at a time.
  void prefetch(const std::vector<UnitRun>& runs) const;
  /// The same for every unit that may hold data (dataRuns()).
  void prefetch() const { prefetch(dataRuns()); }
  /// A copy of the whole image, read through the file descriptor; units in
  /// holes are left zero and not read.
  std::vector<std::byte> copyBytes() const;
  /// Writes the image out, drops it from the page cache and reads back what
  /// may hold data (dataRuns()) in 4 KiB folios. For an image others have
  /// cached in large folios (a VMM's faults, a copy, a sequential read)
  /// before it takes scattered writes. Pages another process still maps stay
  /// as they are.
  void recache();

 private:
  /// pwrite()s all `size` bytes at `offset`, again after a short write.
  void writeAt(const std::byte* data, std::size_t size, std::uint64_t offset);
  /// Finds out whether io_uring completes writes to this file inline
  /// (inline_), writing the first of `sorted` with RWF_NOWAIT on XFS, and
  /// settles writes_ if it was left to choose. Returns how many of `sorted`
  /// that wrote (0 or 1).
  std::size_t probeWrites(std::span<const UnitWrite> sorted);
  /// pread()s all `size` bytes at `offset`; throws Error if the file ends first.
  void readAt(std::byte* into, std::size_t size, std::uint64_t offset) const;

  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::byte* base_ = nullptr;
  bool writable_ = false;
  /// What VMSYNC_IMAGE_WRITES asked for, and how writes go (once known).
  ImageWrites requested_ = ImageWrites::automatic;
  ImageWrites writes_ = ImageWrites::automatic;
  /// Whether io_uring completes buffered writes to the file inline; a ring
  /// sends its writes to a worker at once where it does not.
  bool inline_ = false;
  bool probed_ = false;
  std::unique_ptr<WriteRing> ring_;  // set up at the first write through it
};

}  // namespace vmsync
