// Which unit of a receiver's image holds a given content: the sender's side of
// content references.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace vmsync {

/// Maps a unit hash to one unit whose hash it is, among `hashes` (the hash of
/// every unit of an image, kept by the caller and passed to every call). A
/// unit that the receiver holds elsewhere can then travel as a reference to
/// that unit. The all-zero unit's hash is never indexed (zero units have a
/// cheaper encoding). One unit per hash: when that unit changes, the content
/// leaves the index, even if another unit holds it too.
///
/// An open-addressing table of unit numbers (4 bytes a slot, at most half
/// full) with linear probing: a slot's key is the hash of the unit it names,
/// so a unit must be erased before its hash changes and inserted after.
class ContentIndex {
 public:
  /// An empty index for images of up to 2^32 - 2 units; `zeroHash` is never indexed.
  explicit ContentIndex(std::uint64_t zeroHash) : zeroHash_(zeroHash) {}

  /// Indexes every unit of `hashes` (the first holder of each hash).
  void rebuild(std::span<const std::uint64_t> hashes);
  /// A unit whose hash in `hashes` is `hash`, if one is indexed.
  std::optional<std::uint64_t> find(std::uint64_t hash, std::span<const std::uint64_t> hashes) const;
  /// Takes `unit` out if it is the holder of its hash `hashes[unit]`.
  void erase(std::uint64_t unit, std::span<const std::uint64_t> hashes);
  /// Makes `unit` the holder of `hashes[unit]` unless some unit holds it already.
  void insert(std::uint64_t unit, std::span<const std::uint64_t> hashes);
  /// Hashes indexed.
  std::size_t size() const { return count_; }
  /// Bytes of the table.
  std::uint64_t bytes() const { return slots_.capacity() * sizeof(std::uint32_t); }

 private:
  std::size_t home(std::uint64_t hash) const { return static_cast<std::size_t>(hash) & (slots_.size() - 1); }
  /// Doubles the table (or makes the first one) and indexes its units again.
  void grow(std::span<const std::uint64_t> hashes);
  /// Adds `unit`, whose hash is not indexed yet, without growing.
  void place(std::uint64_t unit, std::uint64_t hash);

  std::uint64_t zeroHash_;
  std::vector<std::uint32_t> slots_;  // unit + 1; 0: empty
  std::size_t count_ = 0;
};

}  // namespace vmsync
