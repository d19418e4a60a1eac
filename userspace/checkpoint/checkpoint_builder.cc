#include "checkpoint/checkpoint_builder.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <unordered_map>

#include "base/error.h"
#include "checkpoint/blob_frames.h"
#include "harvest/unit_hashes.h"

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
    : image_(image),
      policy_(policy),
      compression_{compress ? wire::Compression::LZ4 : wire::Compression::NONE, 0},
      pool_(&defaultThreadPool()),
      receiverHashes_(std::move(receiverHashes)),
      unacknowledged_(image.units()),
      contentIndex_(zeroUnitHash()) {
  if (receiverHashes_.size() != image_.units())
    fail("image {} has {} units but {} receiver hashes were given", image_.path(), image_.units(),
         receiverHashes_.size());
  if (policy_ == wire::Policy::DIFF_PREV) {
    receiverBytes_ = std::move(receiverBytes);
    if (receiverBytes_.empty()) receiverBytes_.assign(image_.sizeBytes(), std::byte{0});
    if (receiverBytes_.size() != image_.sizeBytes())
      fail("reference copy of {} has {} bytes, the image {}", image_.path(), receiverBytes_.size(), image_.sizeBytes());
  }
  setContentReferences(!isOrigPolicy(policy_));
}

void ImageTracker::setContentReferences(bool on) {
  // Orig measures against the base, and a receiver may apply the latest
  // checkpoint alone: what it holds before one is not known here.
  referencesOn_ = on && !isOrigPolicy(policy_);
  if (referencesOn_)
    contentIndex_.rebuild(receiverHashes_);
  else
    contentIndex_ = ContentIndex(zeroUnitHash());
}

std::optional<UnitReference> ImageTracker::referenceFor(std::span<const std::byte> copy, std::uint64_t hash) const {
  if (!referencesOn_) return std::nullopt;
  const auto source = contentIndex_.find(hash, receiverHashes_);
  if (!source) return std::nullopt;
  // Diff Prev holds the receiver's bytes: the reference is then exact here
  // already; otherwise the receiver's check of the hash decides.
  if (!receiverBytes_.empty() &&
      std::memcmp(receiverBytes_.data() + *source * kUnitSize, copy.data(), kUnitSize) != 0)
    return std::nullopt;
  return UnitReference{*source, hash};
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
  sinceBase_.assign(image_.units(), false);
  for (std::uint64_t i = 0; i < baseHashes_.size(); ++i)
    if (baseHashes_[i] != receiverHashes_[i]) sinceBase_[i] = true;
}

namespace {

constexpr std::size_t kScanGrain = 1024;  // units hashed per task (4 MiB)
constexpr std::size_t kEncodeGrain = 32;  // changed units copied and encoded per task, at least
constexpr std::size_t kZstdGrain = 256;   // the same under zstd: a task's blob is one frame (up to 1 MiB)
constexpr std::size_t kMaxBlobs = 64;     // blobs per image, unless they would be larger than
constexpr std::size_t kMaxBlobBytes = std::size_t{256} << 20;

// A task's room starts kMaxPayload x its first unit into the delta's buffer: on
// a word, as Cap'n Proto needs of a blob it references.
static_assert(kMaxPayload % sizeof(capnp::word) == 0);

/// Seconds since some fixed moment, cheap enough to read around every unit.
double secondsNow() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// Adds `seconds` to `total` (tasks on several threads add at once).
void addSeconds(std::atomic<std::uint64_t>& totalNs, double seconds) {
  totalNs.fetch_add(static_cast<std::uint64_t>(seconds * 1e9), std::memory_order_relaxed);
}

/// Closes the gaps the encoding tasks left in `delta.payloads` (room a task did
/// not use, payloads of units dropped or sent as SAME_AS), so that the chunks
/// of each task of `taskBytes` room lie one after the other from its start, a
/// blob; numbers the chunks' blobs and offsets. Each blob is padded with zeros
/// to whole words, which Cap'n Proto reads as part of its segment.
void packBlobs(ImageDelta& delta, std::size_t taskBytes) {
  std::byte* const base = delta.payloads.data();
  std::byte* start = nullptr;  // of the blob being packed
  std::byte* at = nullptr;     // where its next payload goes
  std::size_t task = ~std::size_t{0};
  auto close = [&] {
    if (start == nullptr) return;
    const std::size_t size = static_cast<std::size_t>(at - start);
    std::memset(at, 0, (size + 7) / 8 * 8 - size);
    delta.blobs.emplace_back(start, size);
  };
  for (ChunkView& unit : delta.units) {
    if (unit.data.empty()) continue;
    const std::size_t owner = static_cast<std::size_t>(unit.data.data() - base) / taskBytes;
    if (owner != task) {
      close();
      task = owner;
      start = at = base + owner * taskBytes;
    }
    if (unit.data.data() != at) std::memmove(at, unit.data.data(), unit.data.size());
    unit.blob = static_cast<std::uint32_t>(delta.blobs.size() + 1);
    unit.blobOffset = static_cast<std::uint32_t>(at - start);
    unit.data = {at, unit.data.size()};
    at += unit.data.size();
  }
  close();
}

}  // namespace

std::size_t encodeGrain(std::size_t n, const PayloadCompression& compression) {
  // Each task's payloads become one blob, and a message may have no more than
  // 511 segments (each blob is one). zstd finds more to share in a larger
  // frame, and a task's frame is compressed on one thread.
  const std::size_t least = compression.kind == wire::Compression::ZSTD ? kZstdGrain : kEncodeGrain;
  const std::size_t grain = std::max(least, (n + kMaxBlobs - 1) / kMaxBlobs);
  return std::min(grain, kMaxBlobBytes / kMaxPayload);
}

void ImageTracker::finishBlobs(ImageDelta& delta, std::size_t grain) const {
  packBlobs(delta, grain * kMaxPayload);
  delta.references = 0;
  delta.referenceSavedBytes = 0;
  for (const ChunkView& unit : delta.units) {
    if (unit.encoding != wire::ChunkEncoding::REFERENCE) continue;
    ++delta.references;
    delta.referenceSavedBytes += unit.replacedSize - unit.data.size();
  }
  delta.compression = compression_;
  delta.unframedBytes = 0;
  for (auto blob : delta.blobs) delta.unframedBytes += blob.size();
  delta.encodedBytes = delta.unframedBytes;
  delta.blobFrames.clear();
  delta.frames.clear();
  if (compression_.kind != wire::Compression::ZSTD || delta.blobs.empty()) return;
  // Each blob into one zstd frame, side by side in `frames`, each from a word
  // (Cap'n Proto references a blob in place only there).
  const std::size_t count = delta.blobs.size();
  std::vector<std::size_t> offsets(count + 1, 0);
  for (std::size_t k = 0; k < count; ++k)
    offsets[k + 1] = offsets[k] + (zstdFrameBound(delta.blobs[k].size()) + 7) / 8 * 8;
  delta.frames.resize(offsets[count]);
  std::vector<std::size_t> sizes(count, 0);
  std::atomic<std::uint64_t> spentNs{0};
  pool_->parallelFor(count, 1, [&](std::size_t begin, std::size_t end) {
    const double start = secondsNow();
    for (std::size_t k = begin; k < end; ++k)
      sizes[k] = compressZstdFrame(delta.blobs[k], compression_.level,
                                   {delta.frames.data() + offsets[k], offsets[k + 1] - offsets[k]});
    addSeconds(spentNs, secondsNow() - start);
  });
  delta.blobFrames.resize(count);
  delta.encodedBytes = 0;
  for (std::size_t k = 0; k < count; ++k) {
    // A blob that zstd does not shrink goes as it is.
    if (sizes[k] > 0) {
      std::byte* frame = delta.frames.data() + offsets[k];
      std::memset(frame + sizes[k], 0, (sizes[k] + 7) / 8 * 8 - sizes[k]);
      delta.blobFrames[k] = {wire::Compression::ZSTD, delta.blobs[k].size()};
      delta.blobs[k] = {frame, sizes[k]};
    } else {
      delta.blobFrames[k] = {wire::Compression::NONE, delta.blobs[k].size()};
    }
    delta.encodedBytes += delta.blobs[k].size();
  }
  delta.encodeCpuSeconds += static_cast<double>(spentNs.load()) / 1e9;
}

std::vector<std::uint64_t> ImageTracker::candidateIndexes(const DirtyUnits& candidates) {
  const std::uint64_t count = image_.units();
  // Checked before any state changes, so a bad report loses no retries.
  if (!candidates.everything)
    for (std::uint64_t i : candidates.units)
      if (i >= count) fail("dirty source reported unit {} of {}, which has {} units", i, image_.path(), count);
  // Units of a failed push are candidates again; each is shipped below or found unchanged.
  std::vector<std::uint64_t> indexes;
  if (anyUnacknowledged_) {
    for (std::uint64_t i = 0; i < count; ++i)
      if (unacknowledged_[i]) indexes.push_back(i);
    unacknowledged_.assign(count, false);
    anyUnacknowledged_ = false;
  }
  if (candidates.everything) return {};
  indexes.insert(indexes.end(), candidates.units.begin(), candidates.units.end());
  if (origActive()) {
    // Every unit written since the base may still differ from it.
    for (std::uint64_t i : indexes) sinceBase_[i] = true;
    indexes.clear();
    for (std::uint64_t i = 0; i < count; ++i)
      if (sinceBase_[i]) indexes.push_back(i);
  }
  std::sort(indexes.begin(), indexes.end());
  indexes.erase(std::unique(indexes.begin(), indexes.end()), indexes.end());
  return indexes;
}

std::vector<std::uint64_t> ImageTracker::findChanged(std::vector<std::uint64_t> indexes, bool everything) const {
  // Hash every candidate in place, on every core, and keep those whose hash
  // differs from the reference (most do not: this is the memory-bound part).
  // Not for a dirty-page list under Prev: it names units written since the
  // last harvest, nearly all changed, and copyAndEncode() hashes its copy of
  // each anyway and drops those that are not.
  if (!everything && !origActive()) return indexes;
  std::vector<std::uint64_t> changed;
  if (everything) {
    // A scan of the whole image does not read the units in holes of the file:
    // they read as zeros, so only the zero hash is compared.
    const auto spans = spansByHoles(image_.dataRuns(), image_.units(), kScanGrain);
    std::vector<std::vector<std::uint64_t>> changedPerSpan(spans.size());
    pool_->parallelFor(spans.size(), 1, [&](std::size_t begin, std::size_t end) {
      for (std::size_t s = begin; s < end; ++s) {
        const UnitSpan& span = spans[s];
        for (std::uint64_t i = span.first; i < span.end; ++i) {
          const std::uint64_t hash = span.hole ? zeroUnitHash() : hashUnit(image_.unit(i));
          if (hash != referenceHash(i)) changedPerSpan[s].push_back(i);
        }
      }
    });
    for (const auto& part : changedPerSpan) changed.insert(changed.end(), part.begin(), part.end());
    return changed;
  }
  std::vector<std::vector<std::uint64_t>> changedPerTask((indexes.size() + kScanGrain - 1) / kScanGrain);
  pool_->parallelFor(indexes.size(), kScanGrain, [&](std::size_t begin, std::size_t end) {
    auto& part = changedPerTask[begin / kScanGrain];
    for (std::size_t k = begin; k < end; ++k)
      if (hashUnit(image_.unit(indexes[k])) != referenceHash(indexes[k])) part.push_back(indexes[k]);
  });
  for (const auto& part : changedPerTask) changed.insert(changed.end(), part.begin(), part.end());
  return changed;
}

ChunkView ImageTracker::encodeUnit(std::uint64_t index, std::span<const std::byte> copy, std::uint64_t hash,
                                   bool zero, std::span<std::byte> room) const {
  if (zero) {
    ChunkView unit;
    unit.index = index;
    unit.encoding = wire::ChunkEncoding::ZERO;
    return unit;
  }
  // lz4 per chunk; zstd comes later, over each task's blob.
  const bool lz4 = compression_.kind == wire::Compression::LZ4;
  ChunkView unit;
  if (isDiffPolicy(policy_) && (origActive() || !receiverBytes_.empty())) {
    std::span<const std::byte> reference =
        origActive() ? base_->unit(index)
                     : std::span<const std::byte>(receiverBytes_.data() + index * kUnitSize, kUnitSize);
    unit = encodeDiffInto(index, copy, reference, lz4, room);
  } else {
    // Dirty policies, and the full checkpoint of Diff Orig (before a base exists).
    unit = encodeWholeInto(index, copy, lz4, room);
  }
  // The receiver holds these bytes elsewhere: a reference, when smaller (a
  // small XOR-diff may not be). The payload is not needed any more.
  if (unit.data.size() <= kReferencePayload) return unit;
  const auto reference = referenceFor(copy, hash);
  if (!reference) return unit;
  const auto replaced = static_cast<std::uint32_t>(unit.data.size());
  unit = encodeReferenceInto(index, *reference, room);
  unit.replacedSize = replaced;
  return unit;
}

std::vector<char> ImageTracker::copyAndEncode(const std::vector<std::uint64_t>& changed, std::size_t grain,
                                              ImageDelta& delta, bool encodeNow) const {
  // Copy each changed unit once, straight into the delta; then hash and
  // encode that copy: the VM may write the live page again meanwhile, and
  // only the bytes we ship may be recorded as shipped. A zero page is seen in
  // place and not copied (it ships as ZERO, recorded with the zero hash).
  std::vector<char> ships(changed.size(), 0);
  std::atomic<std::uint64_t> spentNs{0};
  pool_->parallelFor(changed.size(), grain, [&](std::size_t begin, std::size_t end) {
    double encoding = 0;
    // Each unit leaves at most kMaxPayload bytes behind it, so the task stays
    // within [first, first + grain) x kMaxPayload. A pool may hand out several
    // tasks at once (all of them, on one thread): each starts at its own room.
    std::byte* room = nullptr;
    for (std::size_t k = begin; k < end; ++k) {
      if (k % grain == 0 || k == begin) room = delta.payloads.data() + k * kMaxPayload;
      const std::uint64_t index = changed[k];
      const auto live = image_.unit(index);
      std::span<std::byte> copy(delta.raw.data() + k * kUnitSize, kUnitSize);
      const bool zero = isZeroUnit(live);
      if (zero)
        std::memset(copy.data(), 0, kUnitSize);
      else
        std::memcpy(copy.data(), live.data(), kUnitSize);
      const std::uint64_t hash = zero ? zeroUnitHash() : hashUnit(copy);
      if (hash == referenceHash(index)) continue;
      ships[k] = 1;
      delta.hashes[k] = {index, hash};
      if (!encodeNow) {
        delta.units[k].index = index;
        delta.units[k].encoding = zero ? wire::ChunkEncoding::ZERO : wire::ChunkEncoding::WHOLE;
        continue;
      }
      const double start = secondsNow();
      ChunkView& unit = delta.units[k] = encodeUnit(index, copy, hash, zero, {room, kMaxPayload});
      encoding += secondsNow() - start;
      if (unit.data.empty()) continue;
      // A whole unit lz4 does not shrink was left in the copy: it joins the
      // task's payloads (the one copy of a payload, and not of lz4's output).
      if (unit.data.data() != room) {
        std::memcpy(room, unit.data.data(), unit.data.size());
        unit.data = {room, unit.data.size()};
      }
      room += unit.data.size();
    }
    addSeconds(spentNs, encoding);
  });
  delta.encodeCpuSeconds = static_cast<double>(spentNs.load()) / 1e9;
  return ships;
}

namespace {

/// In order: drops the units of `delta` that turned out unchanged, and sends a
/// unit equal to an earlier one of this checkpoint as a reference to it.
void keepShippedUnits(ImageDelta& delta, const std::vector<char>& ships) {
  const std::size_t n = ships.size();
  std::unordered_map<std::uint64_t, std::uint32_t> byHash;
  byHash.reserve(n);
  std::size_t kept = 0;
  for (std::size_t k = 0; k < n; ++k) {
    if (!ships[k]) continue;
    if (kept != k) {
      delta.units[kept] = delta.units[k];
      delta.hashes[kept] = delta.hashes[k];
      std::memcpy(delta.raw.data() + kept * kUnitSize, delta.raw.data() + k * kUnitSize, kUnitSize);
    }
    ChunkView& unit = delta.units[kept];
    const auto position = static_cast<std::uint32_t>(kept);
    if (unit.encoding != wire::ChunkEncoding::ZERO) {
      auto [earlier, first] = byHash.try_emplace(delta.hashes[kept].second, position);
      if (!first && std::memcmp(delta.raw.data() + std::size_t{earlier->second} * kUnitSize,
                                delta.raw.data() + kept * kUnitSize, kUnitSize) == 0) {
        unit = ChunkView{};
        unit.index = delta.hashes[kept].first;
        unit.encoding = wire::ChunkEncoding::SAME_AS;
        unit.sameAs = earlier->second;
      }
    }
    delta.rawBytes += kUnitSize;
    delta.encodedBytes += unit.data.size();
    ++kept;
  }
  delta.units.resize(kept);
  delta.hashes.resize(kept);
  delta.raw.resize(kept * kUnitSize);
}

}  // namespace

ImageDelta ImageTracker::collect(const DirtyUnits& candidates) { return collect(candidates, true); }

ImageDelta ImageTracker::copyChanged(const DirtyUnits& candidates) { return collect(candidates, false); }

void ImageTracker::encode(ImageDelta& delta) const {
  const std::size_t n = delta.units.size();
  delta.payloads.resize(n * kMaxPayload);
  delta.blobs.clear();
  const std::size_t grain = encodeGrain(n, compression_);
  std::atomic<std::uint64_t> spentNs{0};
  pool_->parallelFor(n, grain, [&](std::size_t begin, std::size_t end) {
    const double start = secondsNow();
    std::byte* room = nullptr;
    for (std::size_t k = begin; k < end; ++k) {
      if (k % grain == 0 || k == begin) room = delta.payloads.data() + k * kMaxPayload;
      ChunkView& unit = delta.units[k];
      // A reference to an earlier unit, or a zero unit: nothing to encode.
      if (unit.encoding != wire::ChunkEncoding::WHOLE || !unit.data.empty()) continue;
      std::span<const std::byte> copy(delta.raw.data() + k * kUnitSize, kUnitSize);
      unit = encodeUnit(unit.index, copy, delta.hashes[k].second, false, {room, kMaxPayload});
      if (unit.data.empty()) continue;
      if (unit.data.data() != room) {
        std::memcpy(room, unit.data.data(), unit.data.size());
        unit.data = {room, unit.data.size()};
      }
      room += unit.data.size();
    }
    addSeconds(spentNs, secondsNow() - start);
  });
  delta.encodeCpuSeconds = static_cast<double>(spentNs.load()) / 1e9;
  finishBlobs(delta, grain);
}

ImageDelta ImageTracker::collect(const DirtyUnits& candidates, bool encodeNow) {
  std::vector<std::uint64_t> indexes = candidateIndexes(candidates);
  const bool everything = candidates.everything;
  ImageDelta delta;
  delta.examined = everything ? image_.units() : indexes.size();
  const std::vector<std::uint64_t> changed = findChanged(std::move(indexes), everything);
  const std::size_t n = changed.size();
  delta.units.resize(n);
  delta.hashes.resize(n);
  delta.raw.resize(n * kUnitSize);
  // The encoder writes each payload straight here, kMaxPayload bytes of room per
  // unit, and the units of a task one after the other: only what it writes is
  // touched. Each task's payloads become one blob of the message, so there are
  // few tasks (kMaxBlobs, unless that makes a blob too large).
  if (encodeNow) delta.payloads.resize(n * kMaxPayload);
  const std::size_t grain = encodeGrain(n, compression_);
  keepShippedUnits(delta, copyAndEncode(changed, grain, delta, encodeNow));
  if (encodeNow) finishBlobs(delta, grain);
  return delta;
}

namespace {

/// Writes `delta`'s chunks into `list`, their blob numbers after `blobBase`.
void chunksToWire(const ImageDelta& delta, capnp::List<wire::Chunk>::Builder list,
                  std::uint32_t blobBase) {
  for (std::size_t i = 0; i < delta.units.size(); ++i) {
    ChunkView unit = delta.units[i];
    if (unit.blob != 0) unit.blob += blobBase;
    toWire(unit, list[static_cast<unsigned>(i)]);
  }
}

}  // namespace

void toWire(const ImageDelta& memory, const ImageDelta& disk,
            wire::Checkpoint::Builder checkpoint) {
  const std::size_t count = memory.blobs.size() + disk.blobs.size();
  auto blobs = checkpoint.initBlobs(static_cast<unsigned>(count));
  auto orphanage = capnp::Orphanage::getForMessageContaining(checkpoint);
  unsigned b = 0;
  for (const ImageDelta* delta : {&memory, &disk})
    for (auto blob : delta->blobs)
      blobs.adopt(b++, orphanage.referenceExternalData(capnp::Data::Reader(
                           reinterpret_cast<const kj::byte*>(blob.data()), blob.size())));
  // How each blob travels, when any is a zstd frame.
  bool framed = false;
  for (const ImageDelta* delta : {&memory, &disk})
    for (const BlobFrameInfo& frame : delta->blobFrames) framed |= frame.compression != wire::Compression::NONE;
  if (framed) {
    auto frames = checkpoint.initBlobFrames(static_cast<unsigned>(count));
    unsigned f = 0;
    for (const ImageDelta* delta : {&memory, &disk})
      for (std::size_t k = 0; k < delta->blobs.size(); ++k, ++f) {
        const bool known = k < delta->blobFrames.size();
        frames[f].setCompression(known ? delta->blobFrames[k].compression : wire::Compression::NONE);
        frames[f].setRawSize(known ? delta->blobFrames[k].rawSize : delta->blobs[k].size());
      }
  }
  chunksToWire(memory, checkpoint.initMemory(static_cast<unsigned>(memory.units.size())), 0);
  chunksToWire(disk, checkpoint.initDisk(static_cast<unsigned>(disk.units.size())),
               static_cast<std::uint32_t>(memory.blobs.size()));
}

std::vector<std::uint64_t> ImageTracker::hashesAfter(const ImageDelta& delta) const {
  // Under Orig the receiver rebuilds base + checkpoint: units left out revert.
  std::vector<std::uint64_t> hashes = origActive() ? baseHashes_ : receiverHashes_;
  for (auto [index, hash] : delta.hashes) hashes[index] = hash;
  return hashes;
}

void ImageTracker::acknowledge(const ImageDelta& delta) {
  // As hashesAfter(), in place. The content index follows: each unit out
  // under its old hash before any hash changes, then in under its new one
  // (a content that moved stays indexed at its new place).
  if (referencesOn_)
    for (auto [index, hash] : delta.hashes) contentIndex_.erase(index, receiverHashes_);
  if (origActive()) receiverHashes_.assign(baseHashes_.begin(), baseHashes_.end());
  for (auto [index, hash] : delta.hashes) receiverHashes_[index] = hash;
  if (referencesOn_)
    for (auto [index, hash] : delta.hashes) contentIndex_.insert(index, receiverHashes_);
  if (!receiverBytes_.empty()) {
    for (std::size_t i = 0; i < delta.hashes.size(); ++i)
      std::memcpy(receiverBytes_.data() + delta.hashes[i].first * kUnitSize, delta.raw.data() + i * kUnitSize,
                  kUnitSize);
  }
}

std::uint64_t ImageTracker::stateBytes() const {
  return (receiverHashes_.capacity() + baseHashes_.capacity()) * sizeof(std::uint64_t) + receiverBytes_.capacity() +
         (sinceBase_.capacity() + unacknowledged_.capacity()) / 8 + contentIndex_.bytes();
}

void ImageTracker::retryLater(const ImageDelta& delta) {
  for (const auto& unit : delta.units) unacknowledged_[unit.index] = true;
  anyUnacknowledged_ = anyUnacknowledged_ || !delta.units.empty();
}

}  // namespace vmsync
