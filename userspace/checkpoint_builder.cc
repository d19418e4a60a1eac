#include "checkpoint_builder.h"

#include <algorithm>
#include <array>
#include <cstring>

#include "error.h"
#include "unit_hashes.h"

namespace vmsync {

ImageTracker::ImageTracker(const ImageFile& image, std::vector<std::uint64_t> receiverHashes)
    : image_(image), receiverHashes_(std::move(receiverHashes)) {
  if (receiverHashes_.size() != image_.units())
    fail("image {} has {} units but {} receiver hashes were given", image_.path(), image_.units(),
         receiverHashes_.size());
}

void ImageTracker::consider(std::uint64_t index, bool compress, ImageDelta& delta) {
  ++delta.examined;
  auto live = image_.unit(index);
  if (hashUnit(live) == receiverHashes_[index]) return;
  // Copy first, then hash and encode the copy: the VM may write the live page
  // again meanwhile, and only the bytes we ship may be recorded as shipped.
  alignas(64) std::array<std::byte, kUnitSize> copy;
  std::memcpy(copy.data(), live.data(), kUnitSize);
  std::uint64_t hash = hashUnit(copy);
  if (hash == receiverHashes_[index]) return;
  EncodedUnit unit = encodeWhole(index, copy, compress);
  delta.rawBytes += kUnitSize;
  delta.encodedBytes += unit.data.size();
  delta.units.push_back(std::move(unit));
  delta.hashes.emplace_back(index, hash);
}

ImageDelta ImageTracker::collect(const DirtyUnits& candidates, bool compress) {
  ImageDelta delta;
  const std::uint64_t count = image_.units();
  if (candidates.everything) {
    unacknowledged_.clear();
    for (std::uint64_t i = 0; i < count; ++i) consider(i, compress, delta);
    return delta;
  }
  std::vector<std::uint64_t> indexes(candidates.units);
  indexes.insert(indexes.end(), unacknowledged_.begin(), unacknowledged_.end());
  unacknowledged_.clear();  // each is either shipped again below or found unchanged
  std::sort(indexes.begin(), indexes.end());
  indexes.erase(std::unique(indexes.begin(), indexes.end()), indexes.end());
  for (std::uint64_t i : indexes) {
    if (i >= count) fail("dirty source reported unit {} of {}, which has {} units", i, image_.path(), count);
    consider(i, compress, delta);
  }
  return delta;
}

void ImageTracker::acknowledge(const ImageDelta& delta) {
  for (auto [index, hash] : delta.hashes) receiverHashes_[index] = hash;
}

void ImageTracker::retryLater(const ImageDelta& delta) {
  for (const auto& unit : delta.units) unacknowledged_.insert(unit.index);
}

}  // namespace vmsync
