// Turns harvested candidates into checkpoint chunks and remembers what was shipped.
#pragma once

#include <cstdint>
#include <set>
#include <vector>

#include "chunk_codec.h"
#include "dirty_source.h"
#include "image_file.h"

namespace vmsync {

/// One image's changes, ready to ship, and what shipping them will make the
/// receiver's image look like.
struct ImageDelta {
  std::vector<EncodedUnit> units;                              // chunks, by ascending index
  std::vector<std::pair<std::uint64_t, std::uint64_t>> hashes; // (index, hash of the shipped bytes)
  std::uint64_t examined = 0;                                  // units hashed in place
  std::uint64_t rawBytes = 0;                                  // changed units x 4096
  std::uint64_t encodedBytes = 0;                              // sum of chunk payloads
};

/// Tracks one image (guest RAM or disk) for the active device: the hash of what
/// the receiver holds for every unit, and units whose shipment is not yet
/// acknowledged. Follows the pre-copy rules: candidates come from a source that
/// has already reset its dirty set; each changed unit is copied, the copy is
/// hashed, and that copy is what ships.
class ImageTracker {
 public:
  /// `receiverHashes`: hash of every unit as the receiver has it (zeroUnitHash()
  /// everywhere for a receiver that starts from an empty image).
  ImageTracker(const ImageFile& image, std::vector<std::uint64_t> receiverHashes);

  /// Collects the units among `candidates` (plus any unacknowledged ones) whose
  /// content differs from what the receiver holds. lz4 on top when `compress`.
  ImageDelta collect(const DirtyUnits& candidates, bool compress);

  /// The receiver acknowledged `delta`: it now holds those bytes.
  void acknowledge(const ImageDelta& delta);

  /// Shipping `delta` failed: its units are candidates again next time, even if
  /// the source does not report them again.
  void retryLater(const ImageDelta& delta);

  /// Hashes of what the receiver holds, per unit.
  const std::vector<std::uint64_t>& receiverHashes() const { return receiverHashes_; }

 private:
  void consider(std::uint64_t index, bool compress, ImageDelta& delta);

  const ImageFile& image_;
  std::vector<std::uint64_t> receiverHashes_;
  std::set<std::uint64_t> unacknowledged_;
};

}  // namespace vmsync
