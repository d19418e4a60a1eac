// Encoding of one 4096-byte unit into a wire Chunk, and decoding it back.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "checkpoint/byte_compare.h"
#include "base/units.h"
#include "vmsync.capnp.h"

namespace vmsync {

/// What a chunk says of its unit, besides the payload.
struct ChunkHeader {
  std::uint64_t index = 0;
  wire::ChunkEncoding encoding = wire::ChunkEncoding::WHOLE;
  wire::Compression compression = wire::Compression::NONE;
  std::uint32_t rawSize = 0;     // bytes of the payload after decompression
  std::uint32_t sameAs = 0;      // for SAME_AS: position of the earlier chunk
};

/// One unit as it goes on the wire.
struct EncodedUnit : ChunkHeader {
  std::vector<std::byte> data;   // payload (empty for ZERO and SAME_AS)
};

/// One unit as it goes on the wire, its payload held by someone else: the
/// unit's own bytes (a whole unit sent uncompressed) or the room the encoder was
/// given. Lives no longer than those.
struct ChunkView : ChunkHeader {
  std::span<const std::byte> data;  // payload (empty for ZERO and SAME_AS)
  std::uint32_t blob = 0;           // when non-zero: `data` goes as these bytes of the
  std::uint32_t blobOffset = 0;     //   checkpoint's blob number `blob` (from 1)
  std::uint32_t replacedSize = 0;   // REFERENCE: the payload bytes it replaced (what the unit
                                    //   would have taken without it), for statistics
};

/// Room the payload of one encoded unit can need: lz4's bound for a unit (an
/// XOR-diff is kept below a unit, and needs 16 bytes of slack past its end).
inline constexpr std::size_t kMaxPayload = kUnitSize + kUnitSize / 255 + 16;

/// True when every byte of `unit` is zero.
bool isZeroUnit(std::span<const std::byte> unit);

/// Encodes `current` whole (or as ZERO), then lz4-compresses the payload when
/// `compress` is set and compression makes it smaller.
EncodedUnit encodeWhole(std::uint64_t index, std::span<const std::byte> current, bool compress);

/// Encodes `current` as an XOR-diff against `reference` (QEMU XBZRLE style):
/// repeated [varint unchanged run][varint changed run][the changed run's new
/// bytes]. Returns false, leaving `out` unspecified, when the encoding would be
/// longer than `limit` bytes.
bool encodeXorDiff(std::span<const std::byte> current, std::span<const std::byte> reference,
                   std::size_t limit, std::vector<std::byte>& out);

/// encodeXorDiff() with a given comparison kernel (which must be supported);
/// every kernel gives the same bytes. For tests and benchmarks.
bool encodeXorDiff(std::span<const std::byte> current, std::span<const std::byte> reference,
                   std::size_t limit, std::vector<std::byte>& out, CompareKernel kernel);

/// Applies an XOR-diff to `reference`, writing the result to `out`. Throws Error
/// on malformed input; never reads or writes outside the given spans.
void decodeXorDiff(std::span<const std::byte> diff, std::span<const std::byte> reference,
                   std::span<std::byte> out);

/// Number of bytes that differ between two units (the paper's "changed bytes").
std::uint32_t changedBytes(std::span<const std::byte> current, std::span<const std::byte> reference);

/// Encodes `current` for policy Diff: ZERO when all zero, else an XOR-diff
/// against `reference` when shorter than the whole unit, else WHOLE; lz4 on top
/// when `compress`.
EncodedUnit encodeDiff(std::uint64_t index, std::span<const std::byte> current,
                       std::span<const std::byte> reference, bool compress);

/// encodeWhole() and encodeDiff() with the payload written straight into
/// `room` (kMaxPayload bytes), or for a whole unit sent uncompressed left in
/// `current`: the result points into one of them. Same bytes as those give.
ChunkView encodeWholeInto(std::uint64_t index, std::span<const std::byte> current, bool compress,
                          std::span<std::byte> room);
ChunkView encodeDiffInto(std::uint64_t index, std::span<const std::byte> current,
                         std::span<const std::byte> reference, bool compress, std::span<std::byte> room);

/// What a REFERENCE chunk says: its unit takes the bytes that unit `source` of
/// the receiver's image held before the checkpoint, which hash (hashUnit) to
/// `hash`.
struct UnitReference {
  std::uint64_t source = 0;
  std::uint64_t hash = 0;
};

/// Bytes of a REFERENCE chunk's payload: the source index and the hash, each
/// 8 bytes little-endian.
inline constexpr std::size_t kReferencePayload = 16;

/// A REFERENCE chunk for unit `index`, its payload written into `room` (at
/// least kReferencePayload bytes).
ChunkView encodeReferenceInto(std::uint64_t index, UnitReference reference, std::span<std::byte> room);

/// The reference a REFERENCE chunk carries. Throws Error naming the chunk when
/// its payload is not kReferencePayload plain bytes.
UnitReference referenceOf(std::uint64_t index, wire::Compression compression, std::span<const std::byte> payload);

/// Writes `unit` into a wire chunk, its payload copied into the chunk's `data`.
void toWire(const EncodedUnit& unit, wire::Chunk::Builder chunk);
void toWire(const ChunkView& unit, wire::Chunk::Builder chunk);

/// The payload blobs of one checkpoint: where a chunk's payload is when it is
/// not in the chunk itself. A blob that travels as a zstd frame (blobFrames)
/// is decompressed here, once, into memory this object owns.
class PayloadBlobs {
 public:
  /// No blobs: every payload must be in its chunk.
  PayloadBlobs() = default;
  /// Throws Error naming the blob when a frame is corrupt, when blobFrames
  /// does not describe every blob, or when the blobs would decompress to more
  /// than the checkpoint's chunks can hold (kUnitSize each): the limit is
  /// checked against the declared sizes before anything is allocated.
  explicit PayloadBlobs(wire::Checkpoint::Reader checkpoint);
  PayloadBlobs(PayloadBlobs&&) = default;
  PayloadBlobs& operator=(PayloadBlobs&&) = default;
  /// The payload of `chunk`, pointing into the message or into a decompressed
  /// blob held here. Throws Error naming the chunk when it names bytes outside
  /// the blobs, or carries bytes both in itself and in a blob.
  std::span<const std::byte> payload(wire::Chunk::Reader chunk) const;
  /// Bytes the zstd blobs took on the wire, and decompressed.
  std::uint64_t framedBytes() const { return framedBytes_; }
  std::uint64_t unframedBytes() const { return unframedBytes_; }

 private:
  std::vector<std::span<const std::byte>> blobs_;
  std::vector<std::unique_ptr<std::byte[]>> decompressed_;
  std::uint64_t framedBytes_ = 0;
  std::uint64_t unframedBytes_ = 0;
};

/// Decodes `chunk` into `out` (kUnitSize bytes). `reference` is the unit the
/// policy diffs against (needed for XOR_DIFF only). SAME_AS and REFERENCE
/// chunks are resolved by the caller, which holds the list and the image. Throws Error naming what is malformed
/// (leaving `out` unspecified); never writes outside `out`.
void decodeChunk(wire::Chunk::Reader chunk, std::span<const std::byte> reference,
                 std::span<std::byte> out, const PayloadBlobs& blobs = {});

/// A chunk's fields read out of the message once, so that decoding them (on
/// any thread) touches no Cap'n Proto reader. `payload` points into the message.
struct ChunkFields {
  std::uint64_t index = 0;
  wire::ChunkEncoding encoding = wire::ChunkEncoding::WHOLE;
  wire::Compression compression = wire::Compression::NONE;
  std::uint32_t rawSize = 0;
  std::span<const std::byte> payload;
};
/// The fields of `chunk`, its payload found through `blobs`. Throws Error as
/// PayloadBlobs::payload() does.
ChunkFields chunkFields(wire::Chunk::Reader chunk, const PayloadBlobs& blobs = {});

/// referenceOf() on fields already read out of the message.
UnitReference referenceOf(const ChunkFields& chunk);

/// decodeChunk() on fields already read out of the message.
void decodeUnit(const ChunkFields& chunk, std::span<const std::byte> reference, std::span<std::byte> out);

/// The decoded unit of `chunk` when it needs no decoding: a whole unit sent
/// uncompressed (its bytes in the message) or a zero unit (a static zero page).
/// Empty for every other chunk, malformed ones included: decodeUnit() decides
/// about those.
std::span<const std::byte> unitInPlace(const ChunkFields& chunk);

}  // namespace vmsync
