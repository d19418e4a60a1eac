// Turns harvested candidates into checkpoint chunks and remembers what was shipped.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/chunk_codec.h"
#include "checkpoint/compression_choice.h"
#include "checkpoint/content_index.h"
#include "harvest/dirty_source.h"
#include "vmm/image_file.h"
#include "base/recycled_memory.h"
#include "base/thread_pool.h"

namespace vmsync {

/// Parses "dirty-prev", "diff-prev", "dirty-orig", "diff-orig".
wire::Policy parsePolicy(std::string_view name);
/// The command-line name of a policy.
std::string policyName(wire::Policy policy);
/// True for the policies that ship changed bytes only.
bool isDiffPolicy(wire::Policy policy);
/// True for the policies measured against the original (base) image.
bool isOrigPolicy(wire::Policy policy);

/// How one blob of a delta travels: as it is, or as one zstd frame of
/// `rawSize` bytes.
struct BlobFrameInfo {
  wire::Compression compression = wire::Compression::NONE;
  std::uint64_t rawSize = 0;
};

/// One image's changes, ready to ship, and what shipping them will make the
/// receiver's image look like. The chunks' payloads lie in `payloads`, packed
/// into blobs that a message references without copying them; so a delta is
/// moved, never copied.
struct ImageDelta {
  ImageDelta() = default;
  ImageDelta(ImageDelta&&) = default;
  ImageDelta& operator=(ImageDelta&&) = default;
  ImageDelta(const ImageDelta&) = delete;
  ImageDelta& operator=(const ImageDelta&) = delete;

  std::vector<ChunkView> units;                                // chunks, by ascending index
  std::vector<std::pair<std::uint64_t, std::uint64_t>> hashes; // (index, hash of the shipped bytes)
  std::vector<std::byte, RecyclingAllocator<std::byte>>
      raw;  // shipped bytes, 4096 per entry of `hashes`
  std::vector<std::byte, RecyclingAllocator<std::byte>>
      payloads;                                   // what the encoder wrote (lz4, diffs)
  std::vector<std::span<const std::byte>> blobs;  // what goes on the wire as blobs, in order:
                                                  // parts of `payloads`, or their zstd frames in `frames`
  std::vector<std::byte, RecyclingAllocator<std::byte>> frames;  // zstd: each blob's frame
  std::vector<BlobFrameInfo> blobFrames;  // per blob: none, or zstd with its raw size (empty: all none)
  PayloadCompression compression;         // what the payloads were compressed with
  std::uint64_t examined = 0;             // units hashed in place
  std::uint64_t rawBytes = 0;             // changed units x 4096
  std::uint64_t encodedBytes = 0;         // payload bytes on the wire (the blobs, zstd frames as sent)
  std::uint64_t unframedBytes = 0;        // the chunks' payloads before any zstd frame
  double encodeCpuSeconds = 0;            // CPU of all threads in the encoders and zstd
  std::uint64_t references = 0;           // units sent as REFERENCE chunks
  std::uint64_t referenceSavedBytes = 0;  // payload bytes those saved (before any zstd frame)
};

/// Units per encoding task, for `units` changed units: each task's payloads
/// become one blob (and under zstd one frame, so larger tasks), and a message
/// may have no more than 511 segments. Depends only on its arguments, so a
/// message is the same bytes whatever the number of threads.
std::size_t encodeGrain(std::size_t units, const PayloadCompression& compression);

/// Writes the chunks of both deltas into `checkpoint`, the memory and disk
/// lists and their blobs. The blobs are not copied: the message points at the
/// deltas' payloads, which must outlive it, and anything that sends it.
void toWire(const ImageDelta& memory, const ImageDelta& disk, wire::Checkpoint::Builder checkpoint);

/// Tracks one image (guest RAM or disk) for the active device: the hash of what
/// the receiver holds for every unit, and units whose shipment is not yet
/// acknowledged. Follows the pre-copy rules: candidates come from a source that
/// has already reset its dirty set; each changed unit is copied, the copy is
/// hashed, and that copy is what ships.
///
/// Content references (Prev policies): a content index of the receiver's
/// image (ContentIndex over the receiver hashes, kept current on
/// acknowledge()) finds a changed unit whose bytes the receiver already holds
/// at another index (a page that moved, or came back); the unit then travels
/// as a REFERENCE chunk to that unit, when that is smaller than its other
/// encoding. The receiver applies checkpoints in order, so before this one its
/// image is what the receiver hashes describe; it checks the source's hash
/// before use. Under Diff Prev the source's bytes are compared too.
///
/// Policies: Prev measures each unit against the receiver's current copy; Orig
/// against the base image (set with setBase() once the full checkpoint is
/// acknowledged), so each checkpoint carries every unit that differs from the
/// base and a receiver needs the base plus the latest checkpoint only. Diff
/// keeps a copy of the reference bytes (receiver copy for Prev, the base for
/// Orig) to encode XOR-diffs.
///
/// Candidates are hashed and encoded on a thread pool (defaultThreadPool()
/// unless setThreadPool() names another). State kept per GiB of image: 2 MiB of
/// receiver hashes, 2 MiB more of base hashes under Orig, 64 KiB of unit bitmaps,
/// under Prev up to 4 MiB of content index, and under Diff Prev the reference
/// copy, 1 GiB (see referenceBytes()).
class ImageTracker {
 public:
  /// `receiverHashes`: hash of every unit as the receiver has it.
  /// `receiverBytes`: for Diff Prev, the receiver's bytes (empty: all zero).
  ImageTracker(const ImageFile& image, std::vector<std::uint64_t> receiverHashes, wire::Policy policy, bool compress,
               std::vector<std::byte> receiverBytes = {});

  /// Orig policies: from now on measure against `base` (which must outlive the
  /// tracker).
  void setBase(const ImageFile& base);

  /// Send units the receiver holds elsewhere as references (on by default
  /// under Prev; Orig never does: a receiver may skip checkpoints there).
  void setContentReferences(bool on);
  bool contentReferences() const { return referencesOn_; }

  /// Hash and encode on `pool` (which must outlive the tracker).
  void setThreadPool(ThreadPool& pool) { pool_ = &pool; }

  /// Compress the next deltas' payloads so (the constructor's `compress` means
  /// lz4, or none).
  void setCompression(const PayloadCompression& compression) { compression_ = compression; }
  const PayloadCompression& compression() const { return compression_; }

  /// Collects the units among `candidates` (plus any unacknowledged ones) that
  /// the receiver must be sent under the policy.
  ImageDelta collect(const DirtyUnits& candidates);
  /// The part of collect() that reads the image: the changed units are
  /// copied and hashed, not yet encoded (what must happen while the VM is
  /// paused). encode() finishes the delta; nothing else may use the tracker
  /// in between.
  ImageDelta copyChanged(const DirtyUnits& candidates);
  /// Encodes a delta from copyChanged(), from its copies.
  void encode(ImageDelta& delta) const;

  /// The receiver acknowledged `delta`: it now holds those bytes.
  void acknowledge(const ImageDelta& delta);

  /// Shipping `delta` failed: its units are candidates again next time, even if
  /// the source does not report them again.
  void retryLater(const ImageDelta& delta);

  /// Hashes of what the receiver holds, per unit.
  const std::vector<std::uint64_t>& receiverHashes() const { return receiverHashes_; }
  /// Hashes the receiver will hold once `delta` is acknowledged.
  std::vector<std::uint64_t> hashesAfter(const ImageDelta& delta) const;
  /// Bytes of reference copies this tracker keeps (the policy's space overhead).
  std::uint64_t referenceBytes() const { return receiverBytes_.size(); }
  /// Bytes of all state kept between checkpoints: hashes, bitmaps and the
  /// reference copy (per GiB of image: see the class comment).
  std::uint64_t stateBytes() const;

 private:
  /// Unacknowledged units and `candidates`, sorted and unique (under Orig,
  /// every unit reported since the base); empty when `candidates` is everything.
  std::vector<std::uint64_t> candidateIndexes(const DirtyUnits& candidates);
  /// The candidates (every unit, if `everything`) whose bytes in place differ
  /// from the reference, or may (a dirty-page list under Prev).
  std::vector<std::uint64_t> findChanged(std::vector<std::uint64_t> indexes, bool everything) const;
  /// Copies each unit of `changed` into `delta` (sized for them), hashes the
  /// copy and (if `encodeNow`) encodes it, `grain` units a task; says per unit
  /// whether it ships. Without `encodeNow` a unit's chunk says only ZERO or
  /// WHOLE, with no payload, for encode() to fill in.
  std::vector<char> copyAndEncode(const std::vector<std::uint64_t>& changed, std::size_t grain,
                                  ImageDelta& delta, bool encodeNow) const;
  ImageDelta collect(const DirtyUnits& candidates, bool encodeNow);
  /// One unit's chunk under the policy, its payload written into `room`;
  /// `hash` is the hash of `copy`. A reference when the receiver holds the
  /// bytes elsewhere and that is smaller.
  ChunkView encodeUnit(std::uint64_t index, std::span<const std::byte> copy, std::uint64_t hash, bool zero,
                       std::span<std::byte> room) const;
  /// A unit of the receiver's image that holds `copy` (whose hash is `hash`),
  /// other than a zero unit, when references are on.
  std::optional<UnitReference> referenceFor(std::span<const std::byte> copy, std::uint64_t hash) const;
  /// Packs the payloads into blobs and, under zstd, compresses each blob into
  /// one frame; sets the delta's byte counts. `grain` units were one task.
  void finishBlobs(ImageDelta& delta, std::size_t grain) const;
  bool origActive() const { return base_ != nullptr; }
  std::uint64_t referenceHash(std::uint64_t index) const {
    return origActive() ? baseHashes_[index] : receiverHashes_[index];
  }

  const ImageFile& image_;
  wire::Policy policy_;
  PayloadCompression compression_;
  ThreadPool* pool_;
  std::vector<std::uint64_t> receiverHashes_;
  std::vector<std::byte> receiverBytes_;        // Diff Prev only
  const ImageFile* base_ = nullptr;             // Orig, once the base exists
  std::vector<std::uint64_t> baseHashes_;       // Orig
  std::vector<bool> sinceBase_;                 // Orig: units reported since the base, one bit each
  std::vector<bool> unacknowledged_;            // units of a failed push, one bit each
  bool anyUnacknowledged_ = false;
  bool referencesOn_ = false;                   // Prev, unless turned off
  ContentIndex contentIndex_;                   // of receiverHashes_, while referencesOn_
};

}  // namespace vmsync
