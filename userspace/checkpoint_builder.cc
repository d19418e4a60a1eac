#include "checkpoint_builder.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>

#include "error.h"
#include "unit_hashes.h"

namespace vmsync {

wire::Policy parsePolicy(std::string_view name) {
  if (name == "dirty-prev") return wire::Policy::DIRTY_PREV;
  if (name == "diff-prev") return wire::Policy::DIFF_PREV;
  if (name == "dirty-orig") return wire::Policy::DIRTY_ORIG;
  if (name == "diff-orig") return wire::Policy::DIFF_ORIG;
  fail("unknown policy '{}': use dirty-prev, diff-prev, dirty-orig or diff-orig", name);
}

std::string policyName(wire::Policy policy) {
  switch (policy) {
    case wire::Policy::DIRTY_PREV: return "dirty-prev";
    case wire::Policy::DIFF_PREV: return "diff-prev";
    case wire::Policy::DIRTY_ORIG: return "dirty-orig";
    case wire::Policy::DIFF_ORIG: return "diff-orig";
  }
  return "unknown";
}

bool isDiffPolicy(wire::Policy policy) {
  return policy == wire::Policy::DIFF_PREV || policy == wire::Policy::DIFF_ORIG;
}

bool isOrigPolicy(wire::Policy policy) {
  return policy == wire::Policy::DIRTY_ORIG || policy == wire::Policy::DIFF_ORIG;
}

ImageTracker::ImageTracker(const ImageFile& image, std::vector<std::uint64_t> receiverHashes, wire::Policy policy,
                           bool compress, std::vector<std::byte> receiverBytes)
    : image_(image), policy_(policy), compress_(compress), receiverHashes_(std::move(receiverHashes)) {
  if (receiverHashes_.size() != image_.units())
    fail("image {} has {} units but {} receiver hashes were given", image_.path(), image_.units(),
         receiverHashes_.size());
  if (policy_ == wire::Policy::DIFF_PREV) {
    receiverBytes_ = std::move(receiverBytes);
    if (receiverBytes_.empty()) receiverBytes_.assign(image_.sizeBytes(), std::byte{0});
    if (receiverBytes_.size() != image_.sizeBytes())
      fail("reference copy of {} has {} bytes, the image {}", image_.path(), receiverBytes_.size(), image_.sizeBytes());
  }
}

void ImageTracker::setBase(const ImageFile& base) {
  if (!isOrigPolicy(policy_)) return;
  if (base.sizeBytes() != image_.sizeBytes())
    fail("base image {} has {} bytes, the image {} has {}", base.path(), base.sizeBytes(), image_.path(),
         image_.sizeBytes());
  base_ = &base;
  baseHashes_ = hashAllUnits(base);
  // Units where the receiver already differs from the base stay candidates
  // for as long as the base is the reference.
  sinceBase_.clear();
  for (std::uint64_t i = 0; i < baseHashes_.size(); ++i)
    if (baseHashes_[i] != receiverHashes_[i]) sinceBase_.insert(i);
}

void ImageTracker::consider(std::uint64_t index, ImageDelta& delta, std::map<std::uint64_t, std::uint32_t>& byHash) {
  ++delta.examined;
  auto live = image_.unit(index);
  // Against what is the unit measured: the base for Orig, else what the receiver holds.
  const std::uint64_t referenceHash = origActive() ? baseHashes_[index] : receiverHashes_[index];
  if (hashUnit(live) == referenceHash) return;
  // Copy first, then hash and encode the copy: the VM may write the live page
  // again meanwhile, and only the bytes we ship may be recorded as shipped.
  alignas(64) std::array<std::byte, kUnitSize> copy;
  std::memcpy(copy.data(), live.data(), kUnitSize);
  const std::uint64_t hash = hashUnit(copy);
  if (hash == referenceHash) return;

  EncodedUnit unit;
  auto earlier = byHash.find(hash);
  if (earlier != byHash.end() &&
      std::memcmp(delta.raw.data() + std::size_t{earlier->second} * kUnitSize, copy.data(), kUnitSize) == 0 &&
      !isZeroUnit(copy)) {
    unit.index = index;
    unit.encoding = wire::ChunkEncoding::SAME_AS;
    unit.sameAs = earlier->second;
  } else if (isDiffPolicy(policy_) && (origActive() || !receiverBytes_.empty())) {
    std::span<const std::byte> reference =
        origActive() ? base_->unit(index)
                     : std::span<const std::byte>(receiverBytes_.data() + index * kUnitSize, kUnitSize);
    unit = encodeDiff(index, copy, reference, compress_);
  } else {
    // Dirty policies, and the full checkpoint of Diff Orig (before a base exists).
    unit = encodeWhole(index, copy, compress_);
  }
  const auto position = static_cast<std::uint32_t>(delta.units.size());
  if (unit.encoding != wire::ChunkEncoding::SAME_AS) byHash.emplace(hash, position);
  delta.rawBytes += kUnitSize;
  delta.encodedBytes += unit.data.size();
  delta.units.push_back(std::move(unit));
  delta.hashes.emplace_back(index, hash);
  delta.raw.insert(delta.raw.end(), copy.begin(), copy.end());
}

ImageDelta ImageTracker::collect(const DirtyUnits& candidates) {
  ImageDelta delta;
  std::map<std::uint64_t, std::uint32_t> byHash;
  const std::uint64_t count = image_.units();
  // Units of a failed push are candidates again; each is shipped below or found unchanged.
  std::vector<std::uint64_t> retry(unacknowledged_.begin(), unacknowledged_.end());
  unacknowledged_.clear();
  if (candidates.everything) {
    for (std::uint64_t i = 0; i < count; ++i) consider(i, delta, byHash);
    return delta;
  }
  std::vector<std::uint64_t> indexes(candidates.units);
  indexes.insert(indexes.end(), retry.begin(), retry.end());
  for (std::uint64_t i : indexes)
    if (i >= count) fail("dirty source reported unit {} of {}, which has {} units", i, image_.path(), count);
  if (origActive()) {
    // Every unit written since the base may still differ from it.
    sinceBase_.insert(indexes.begin(), indexes.end());
    indexes.assign(sinceBase_.begin(), sinceBase_.end());
  }
  std::sort(indexes.begin(), indexes.end());
  indexes.erase(std::unique(indexes.begin(), indexes.end()), indexes.end());
  for (std::uint64_t i : indexes) consider(i, delta, byHash);
  return delta;
}

std::vector<std::uint64_t> ImageTracker::hashesAfter(const ImageDelta& delta) const {
  // Under Orig the receiver rebuilds base + checkpoint: units left out revert.
  std::vector<std::uint64_t> hashes = origActive() ? baseHashes_ : receiverHashes_;
  for (auto [index, hash] : delta.hashes) hashes[index] = hash;
  return hashes;
}

void ImageTracker::acknowledge(const ImageDelta& delta) {
  receiverHashes_ = hashesAfter(delta);
  if (!receiverBytes_.empty()) {
    for (std::size_t i = 0; i < delta.hashes.size(); ++i)
      std::memcpy(receiverBytes_.data() + delta.hashes[i].first * kUnitSize, delta.raw.data() + i * kUnitSize,
                  kUnitSize);
  }
}

void ImageTracker::retryLater(const ImageDelta& delta) {
  for (const auto& unit : delta.units) unacknowledged_.insert(unit.index);
}

}  // namespace vmsync
