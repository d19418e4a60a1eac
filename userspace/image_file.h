// A guest image file (RAM file or raw disk) seen as an array of 4096-byte units.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "units.h"

namespace vmsync {

/// One unit to write: which, and its kUnitSize bytes.
struct UnitWrite {
  std::uint64_t index = 0;
  const std::byte* bytes = nullptr;
};

/// An open image file mapped shared, so reads see what the VMM writes with no
/// copy through the VMM. Writes go through pwrite so the page cache stays the one
/// authority for the mapping, the VMM and the file.
class ImageFile {
 public:
  /// Opens `path`; with `createBytes` > 0 the file is created (or resized) sparse
  /// to that size first. `writable` allows write()/sync().
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
  /// Writes many units, each index at most once, in any order: runs of
  /// consecutive units go out in one pwritev. Checks every index before writing
  /// anything. Throws Error naming the file on failure.
  void writeUnits(std::span<const UnitWrite> writes);
  /// Flushes written data to stable storage.
  void sync();

 private:
  /// pwrite()s all `size` bytes at `offset`, again after a short write.
  void writeAt(const std::byte* data, std::size_t size, std::uint64_t offset);

  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::byte* base_ = nullptr;
};

}  // namespace vmsync
