#include "checkpoint/chunk_codec.h"

#include <lz4.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <optional>

#include "checkpoint/blob_frames.h"
#include "checkpoint/byte_compare.h"
#include "base/error.h"
#include "base/units.h"

namespace vmsync {

bool isZeroUnit(std::span<const std::byte> unit) {
  // Blocks of 256 bytes OR-ed word-wise (the compiler vectorizes each block):
  // most non-zero units stop after the first block.
  const std::byte* bytes = unit.data();
  const std::size_t n = unit.size();
  std::size_t i = 0;
  for (; i + 256 <= n; i += 256) {
    std::uint64_t acc = 0;
    for (std::size_t k = 0; k < 32; ++k) {
      std::uint64_t word;
      std::memcpy(&word, bytes + i + k * 8, 8);
      acc |= word;
    }
    if (acc != 0) return false;
  }
  for (; i < n; ++i)
    if (bytes[i] != std::byte{0}) return false;
  return true;
}

namespace {

static_assert(kMaxPayload == LZ4_COMPRESSBOUND(kUnitSize));

/// lz4-compresses `raw` into `room` (at least lz4's bound for it); returns the
/// compressed size, or 0 when compression does not make it smaller.
std::size_t compressInto(std::span<const std::byte> raw, std::span<std::byte> room) {
  if (raw.empty()) return 0;
  int n = LZ4_compress_default(reinterpret_cast<const char*>(raw.data()), reinterpret_cast<char*>(room.data()),
                               static_cast<int>(raw.size()), static_cast<int>(room.size()));
  if (n <= 0 || static_cast<std::size_t>(n) >= raw.size()) return 0;
  return static_cast<std::size_t>(n);
}

/// The chunk as an EncodedUnit holding a copy of its payload.
EncodedUnit owning(const ChunkView& chunk) {
  return EncodedUnit{chunk, {chunk.data.begin(), chunk.data.end()}};
}

/// Per-thread room for the encoders that return an EncodedUnit.
std::span<std::byte> threadRoom() {
  thread_local std::array<std::byte, kMaxPayload> room;
  return room;
}

}  // namespace

ChunkView encodeWholeInto(std::uint64_t index, std::span<const std::byte> current, bool compress,
                          std::span<std::byte> room) {
  ChunkView chunk;
  chunk.index = index;
  if (isZeroUnit(current)) {
    chunk.encoding = wire::ChunkEncoding::ZERO;
    return chunk;
  }
  chunk.encoding = wire::ChunkEncoding::WHOLE;
  chunk.rawSize = static_cast<std::uint32_t>(current.size());
  // Compressed straight from `current`; left where it is when lz4 does not help.
  if (compress) {
    if (std::size_t n = compressInto(current, room); n > 0) {
      chunk.compression = wire::Compression::LZ4;
      chunk.data = room.first(n);
      return chunk;
    }
  }
  chunk.data = current;
  return chunk;
}

EncodedUnit encodeWhole(std::uint64_t index, std::span<const std::byte> current, bool compress) {
  return owning(encodeWholeInto(index, current, compress, threadRoom()));
}

namespace {

/// Reads a varint of at most 3 bytes (values below 2^21, enough for a unit).
bool getVarint(std::span<const std::byte> in, std::size_t& pos, std::uint32_t& value) {
  value = 0;
  for (int shift = 0; shift < 21; shift += 7) {
    if (pos >= in.size()) return false;
    auto b = std::to_integer<std::uint32_t>(in[pos++]);
    value |= (b & 0x7F) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;
}

}  // namespace

namespace {

/// Room for the changed-byte mask of `n` bytes: on the stack for a unit, on
/// the heap for anything larger.
struct MaskStorage {
  std::array<std::uint64_t, diffMaskWords(kUnitSize)> unit;
  std::vector<std::uint64_t> large;

  std::span<std::uint64_t> forBytes(std::size_t n) {
    if (n <= kUnitSize) return {unit.data(), diffMaskWords(n)};
    large.resize(diffMaskWords(n));
    return large;
  }
};

/// Bytes a varint of `value` takes.
inline std::size_t varintSize(std::uint32_t value) {
  std::size_t n = 1;
  while (value >= 0x80) {
    value >>= 7;
    ++n;
  }
  return n;
}

inline std::byte* writeVarint(std::byte* out, std::uint32_t value) {
  while (value >= 0x80) {
    *out++ = static_cast<std::byte>((value & 0x7F) | 0x80);
    value >>= 7;
  }
  *out++ = static_cast<std::byte>(value);
  return out;
}

}  // namespace

bool encodeXorDiff(std::span<const std::byte> current, std::span<const std::byte> reference, std::size_t limit,
                   std::vector<std::byte>& out) {
  return encodeXorDiff(current, reference, limit, out, bestCompareKernel());
}

namespace {

/// Bytes past an XOR-diff's end that encoding it may write: short runs are
/// copied 16 bytes at a time.
constexpr std::size_t kDiffSlack = 16;

/// Room an XOR-diff of `n` bytes kept to `limit` needs. Each run has at least
/// one changed byte and two varints of at most 5 bytes, so 11 bytes per input
/// byte bound any encoding.
std::size_t diffRoom(std::size_t n, std::size_t limit) { return std::min(limit, 11 * n) + kDiffSlack; }

/// Encodes the XOR-diff into `begin` (diffRoom() bytes); returns its size, or
/// nothing when it would be longer than `limit`.
std::optional<std::size_t> encodeXorDiffTo(std::span<const std::byte> current, std::span<const std::byte> reference,
                                           std::size_t limit, CompareKernel kernel, std::byte* const begin) {
  const std::size_t n = current.size();
  if (reference.size() != n) fail("xor-diff reference has {} bytes, the unit {}", reference.size(), n);
  // The mask of changed bytes, then its runs: the encoding is fixed by the mask,
  // so every kernel gives the same bytes.
  MaskStorage storage;
  const std::span<std::uint64_t> mask = storage.forBytes(n);
  diffMask(kernel, current, reference, mask);
  constexpr std::size_t kSlack = kDiffSlack;
  std::byte* at = begin;
  std::size_t unchangedFrom = 0;  // where the current unchanged run began
  std::size_t changedFrom = 0;    // where the current changed run began
  bool inChanged = false;
  // Emits the run of unchanged bytes [unchangedFrom, changedFrom) and the
  // changed bytes [changedFrom, end).
  auto emit = [&](std::size_t end) {
    const auto same = static_cast<std::uint32_t>(changedFrom - unchangedFrom);
    const auto changed = static_cast<std::uint32_t>(end - changedFrom);
    if ((same | changed) < 0x80) {
      if (static_cast<std::size_t>(at - begin) + 2 + changed > limit) return false;
      at[0] = static_cast<std::byte>(same);
      at[1] = static_cast<std::byte>(changed);
      at += 2;
    } else {
      if (static_cast<std::size_t>(at - begin) + varintSize(same) + varintSize(changed) + changed > limit) return false;
      at = writeVarint(at, same);
      at = writeVarint(at, changed);
    }
    if (changed <= kSlack && changedFrom + kSlack <= n)
      std::memcpy(at, current.data() + changedFrom, kSlack);
    else
      std::memcpy(at, current.data() + changedFrom, changed);
    at += changed;
    unchangedFrom = end;
    return true;
  };
  // Walk the positions where the mask flips: each changed run starts at one and
  // ends at the next. Bits past the end are zero, so a run reaching the end of
  // a partial last word ends there.
  std::uint64_t previous = 0;  // the bit before the current word
  for (std::size_t word = 0; word < mask.size(); ++word) {
    const std::uint64_t bits = mask[word];
    std::uint64_t flips = bits ^ ((bits << 1) | previous);
    previous = bits >> 63;
    while (flips != 0) {
      const std::size_t position = word * 64 + static_cast<std::size_t>(std::countr_zero(flips));
      flips &= flips - 1;
      if (!inChanged) {
        changedFrom = position;
      } else if (!emit(position)) {
        return std::nullopt;
      }
      inChanged = !inChanged;
    }
  }
  if (inChanged && !emit(n)) return std::nullopt;
  return static_cast<std::size_t>(at - begin);
}

}  // namespace

bool encodeXorDiff(std::span<const std::byte> current, std::span<const std::byte> reference, std::size_t limit,
                   std::vector<std::byte>& out, CompareKernel kernel) {
  out.clear();
  // Runs are written to a scratch buffer that never shrinks, then copied out at
  // their exact size.
  thread_local std::vector<std::byte> scratch;
  const std::size_t capacity = diffRoom(current.size(), limit);
  if (scratch.size() < capacity) scratch.resize(capacity);
  auto size = encodeXorDiffTo(current, reference, limit, kernel, scratch.data());
  if (!size) return false;
  out.assign(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(*size));
  return true;
}

void decodeXorDiff(std::span<const std::byte> diff, std::span<const std::byte> reference, std::span<std::byte> out) {
  if (reference.size() != out.size()) fail("xor-diff reference has {} bytes, expected {}", reference.size(), out.size());
  std::memcpy(out.data(), reference.data(), out.size());
  std::size_t pos = 0, at = 0;
  while (pos < diff.size()) {
    std::uint32_t same = 0, changed = 0;
    if (!getVarint(diff, pos, same) || !getVarint(diff, pos, changed))
      fail("xor-diff is malformed: bad run length at byte {}", pos);
    if (changed == 0) fail("xor-diff is malformed: empty changed run at byte {}", pos);
    if (same > out.size() - at || changed > out.size() - at - same)
      fail("xor-diff is malformed: runs go past the end of the unit");
    if (changed > diff.size() - pos) fail("xor-diff is malformed: changed run is truncated");
    at += same;
    std::memcpy(out.data() + at, diff.data() + pos, changed);
    at += changed;
    pos += changed;
  }
}

std::uint32_t changedBytes(std::span<const std::byte> current, std::span<const std::byte> reference) {
  MaskStorage storage;
  const std::span<std::uint64_t> mask = storage.forBytes(current.size());
  diffMask(current, reference, mask);
  std::uint32_t count = 0;
  for (std::uint64_t word : mask) count += static_cast<std::uint32_t>(std::popcount(word));
  return count;
}

ChunkView encodeDiffInto(std::uint64_t index, std::span<const std::byte> current,
                         std::span<const std::byte> reference, bool compress, std::span<std::byte> room) {
  if (isZeroUnit(current)) return encodeWholeInto(index, current, compress, room);
  constexpr std::size_t kLimit = kUnitSize - 1;
  if (diffRoom(current.size(), kLimit) > room.size())
    fail("encoder room of {} bytes is too small for a unit of {}", room.size(), current.size());
  // Without lz4 the diff is written into `room`; with it, into a per-thread
  // buffer that lz4 reads from, and copied only when lz4 does not help.
  thread_local std::array<std::byte, kMaxPayload> diff;
  std::byte* const target = compress ? diff.data() : room.data();
  auto size = encodeXorDiffTo(current, reference, kLimit, bestCompareKernel(), target);
  if (!size) return encodeWholeInto(index, current, compress, room);
  ChunkView chunk;
  chunk.index = index;
  chunk.encoding = wire::ChunkEncoding::XOR_DIFF;
  chunk.rawSize = static_cast<std::uint32_t>(*size);
  if (compress) {
    if (std::size_t n = compressInto({diff.data(), *size}, room); n > 0) {
      chunk.compression = wire::Compression::LZ4;
      chunk.data = room.first(n);
      return chunk;
    }
    std::memcpy(room.data(), diff.data(), *size);
  }
  chunk.data = room.first(*size);
  return chunk;
}

EncodedUnit encodeDiff(std::uint64_t index, std::span<const std::byte> current, std::span<const std::byte> reference,
                       bool compress) {
  return owning(encodeDiffInto(index, current, reference, compress, threadRoom()));
}

ChunkView encodeReferenceInto(std::uint64_t index, UnitReference reference, std::span<std::byte> room) {
  if (room.size() < kReferencePayload)
    fail("encoder room of {} bytes is too small for a reference ({} bytes)", room.size(), kReferencePayload);
  for (std::size_t b = 0; b < 8; ++b) {
    room[b] = static_cast<std::byte>(reference.source >> (8 * b));
    room[8 + b] = static_cast<std::byte>(reference.hash >> (8 * b));
  }
  ChunkView chunk;
  chunk.index = index;
  chunk.encoding = wire::ChunkEncoding::REFERENCE;
  chunk.rawSize = static_cast<std::uint32_t>(kReferencePayload);
  chunk.data = room.first(kReferencePayload);
  return chunk;
}

UnitReference referenceOf(std::uint64_t index, wire::Compression compression, std::span<const std::byte> payload) {
  if (compression != wire::Compression::NONE)
    fail("chunk {}: a reference is never compressed (compression {})", index, static_cast<unsigned>(compression));
  if (payload.size() != kReferencePayload)
    fail("chunk {}: a reference has {} bytes, expected {}", index, payload.size(), kReferencePayload);
  UnitReference reference;
  for (std::size_t b = 0; b < 8; ++b) {
    reference.source |= std::to_integer<std::uint64_t>(payload[b]) << (8 * b);
    reference.hash |= std::to_integer<std::uint64_t>(payload[8 + b]) << (8 * b);
  }
  return reference;
}

UnitReference referenceOf(const ChunkFields& chunk) {
  return referenceOf(chunk.index, chunk.compression, chunk.payload);
}

void toWire(const EncodedUnit& unit, wire::Chunk::Builder chunk) {
  toWire(ChunkView{unit, unit.data}, chunk);
}

void toWire(const ChunkView& unit, wire::Chunk::Builder chunk) {
  chunk.setIndex(unit.index);
  chunk.setEncoding(unit.encoding);
  chunk.setCompression(unit.compression);
  chunk.setRawSize(unit.rawSize);
  chunk.setSameAs(unit.sameAs);
  if (unit.blob != 0) {
    chunk.setBlob(unit.blob);
    chunk.setBlobOffset(unit.blobOffset);
    chunk.setBlobSize(static_cast<std::uint32_t>(unit.data.size()));
  } else if (!unit.data.empty()) {
    chunk.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(unit.data.data()), unit.data.size()));
  }
}

PayloadBlobs::PayloadBlobs(wire::Checkpoint::Reader checkpoint) {
  const auto blobs = checkpoint.getBlobs();
  const auto frames = checkpoint.getBlobFrames();
  const std::uint64_t sequence = checkpoint.getSequence();
  if (frames.size() != 0 && frames.size() != blobs.size())
    fail("checkpoint {}: {} blob frames for {} blobs", sequence, frames.size(), blobs.size());
  // No chunk's payload is longer than a unit once the frame is undone (a
  // whole unit, a diff kept below one, lz4 kept when smaller), so the chunks
  // bound what the blobs may decompress to, as they bound the decoded units.
  const std::uint64_t limit =
      (std::uint64_t{checkpoint.getMemory().size()} + checkpoint.getDisk().size()) * kUnitSize;
  std::uint64_t total = 0;
  for (unsigned k = 0; k < blobs.size(); ++k) {
    const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(blobs[k].begin()), blobs[k].size());
    const wire::Compression compression = frames.size() ? frames[k].getCompression() : wire::Compression::NONE;
    const std::uint64_t rawSize = frames.size() ? frames[k].getRawSize() : bytes.size();
    switch (compression) {
      case wire::Compression::NONE:
        if (rawSize != bytes.size())
          fail("checkpoint {}: blob {} is plain with {} bytes, but its frame says {}", sequence, k + 1, bytes.size(),
               rawSize);
        blobs_.push_back(bytes);
        break;
      case wire::Compression::ZSTD: {
        if (rawSize > limit - total)
          fail("checkpoint {}: blob {} says it decompresses to {} bytes; its {} chunks hold at most {} in all",
               sequence, k + 1, rawSize, limit / kUnitSize, limit);
        total += rawSize;
        auto& out = decompressed_.emplace_back(std::make_unique_for_overwrite<std::byte[]>(rawSize));
        decompressZstdFrame(bytes, {out.get(), rawSize}, fmt::format("checkpoint {}: blob {}", sequence, k + 1));
        blobs_.emplace_back(out.get(), rawSize);
        framedBytes_ += bytes.size();
        unframedBytes_ += rawSize;
        break;
      }
      default:
        fail("checkpoint {}: blob {} has compression {}, which applies to chunks, not blobs", sequence, k + 1,
             static_cast<unsigned>(compression));
    }
  }
}

std::span<const std::byte> PayloadBlobs::payload(wire::Chunk::Reader chunk) const {
  auto data = chunk.getData();
  const std::uint32_t blob = chunk.getBlob();
  if (blob == 0) {
    if (chunk.getBlobOffset() != 0 || chunk.getBlobSize() != 0)
      fail("chunk {}: blob offset or size given, but no blob", chunk.getIndex());
    return {reinterpret_cast<const std::byte*>(data.begin()), data.size()};
  }
  if (data.size() != 0)
    fail("chunk {}: carries {} bytes of its own and names blob {} too", chunk.getIndex(),
         data.size(), blob);
  if (blob > blobs_.size())
    fail("chunk {}: names blob {}, but the checkpoint has {}", chunk.getIndex(), blob,
         blobs_.size());
  const auto bytes = blobs_[blob - 1];
  const std::uint64_t offset = chunk.getBlobOffset(), size = chunk.getBlobSize();
  if (offset + size > bytes.size())
    fail("chunk {}: names bytes {}..{} of blob {}, which has {}", chunk.getIndex(), offset,
         offset + size, blob, bytes.size());
  return bytes.subspan(offset, size);
}

ChunkFields chunkFields(wire::Chunk::Reader chunk, const PayloadBlobs& blobs) {
  return ChunkFields{chunk.getIndex(), chunk.getEncoding(), chunk.getCompression(),
                     chunk.getRawSize(), blobs.payload(chunk)};
}

void decodeChunk(wire::Chunk::Reader chunk, std::span<const std::byte> reference,
                 std::span<std::byte> out, const PayloadBlobs& blobs) {
  decodeUnit(chunkFields(chunk, blobs), reference, out);
}

void decodeUnit(const ChunkFields& chunk, std::span<const std::byte> reference, std::span<std::byte> out) {
  if (out.size() != kUnitSize) fail("decode buffer of {} bytes, expected {}", out.size(), kUnitSize);
  std::span<const std::byte> payload = chunk.payload;
  switch (chunk.compression) {
    case wire::Compression::NONE:
      break;
    case wire::Compression::LZ4: {
      std::uint32_t raw = chunk.rawSize;
      if (raw == 0 || raw > kUnitSize * 2)
        fail("chunk {}: lz4 raw size {} out of range (1..{})", chunk.index, raw, kUnitSize * 2);
      // A whole unit decompresses straight into `out`; anything else (a diff,
      // or a size the checks below refuse) into a per-thread buffer.
      const bool direct = chunk.encoding == wire::ChunkEncoding::WHOLE && raw == kUnitSize;
      thread_local std::vector<std::byte> decompressed;
      if (!direct && decompressed.size() < kUnitSize * 2) decompressed.resize(kUnitSize * 2);
      std::byte* target = direct ? out.data() : decompressed.data();
      int n = LZ4_decompress_safe(reinterpret_cast<const char*>(payload.data()), reinterpret_cast<char*>(target),
                                  static_cast<int>(payload.size()), static_cast<int>(raw));
      if (n != static_cast<int>(raw)) fail("chunk {}: lz4 data is corrupt", chunk.index);
      if (direct) return;
      payload = std::span<const std::byte>(decompressed.data(), raw);
      break;
    }
    case wire::Compression::ZSTD:
      fail("chunk {}: zstd compresses whole blobs (blobFrames), not a single chunk", chunk.index);
    default:
      fail("chunk {}: unknown compression {}", chunk.index, static_cast<unsigned>(chunk.compression));
  }
  switch (chunk.encoding) {
    case wire::ChunkEncoding::WHOLE:
      if (payload.size() != kUnitSize)
        fail("chunk {}: whole unit has {} bytes, expected {}", chunk.index, payload.size(), kUnitSize);
      std::memcpy(out.data(), payload.data(), kUnitSize);
      return;
    case wire::ChunkEncoding::ZERO:
      if (!payload.empty()) fail("chunk {}: zero unit carries {} bytes of data", chunk.index, payload.size());
      std::memset(out.data(), 0, kUnitSize);
      return;
    case wire::ChunkEncoding::XOR_DIFF:
      if (reference.size() != kUnitSize) fail("chunk {}: xor-diff without a reference unit", chunk.index);
      try {
        decodeXorDiff(payload, reference, out);
      } catch (const Error& e) {
        fail("chunk {}: {}", chunk.index, e.what());
      }
      return;
    case wire::ChunkEncoding::REFERENCE:
      fail("chunk {}: a reference names another unit of the image, and is resolved against it", chunk.index);
    default:
      fail("chunk {}: encoding {} is not supported here", chunk.index,
           static_cast<unsigned>(chunk.encoding));
  }
}

std::span<const std::byte> unitInPlace(const ChunkFields& chunk) {
  if (chunk.compression != wire::Compression::NONE) return {};
  switch (chunk.encoding) {
    case wire::ChunkEncoding::WHOLE:
      if (chunk.payload.size() != kUnitSize) return {};
      return chunk.payload;
    case wire::ChunkEncoding::ZERO: {
      alignas(4096) static const std::array<std::byte, kUnitSize> zero{};
      if (!chunk.payload.empty()) return {};
      return zero;
    }
    default:
      return {};
  }
}

}  // namespace vmsync
