#include "chunk_codec.h"

#include <lz4.h>

#include <algorithm>
#include <cstring>

#include "error.h"
#include "units.h"

namespace vmsync {

bool isZeroUnit(std::span<const std::byte> unit) {
  // Compare word-wise: the compiler vectorizes this loop.
  const auto* words = reinterpret_cast<const std::uint64_t*>(unit.data());
  std::uint64_t acc = 0;
  for (std::size_t i = 0; i < unit.size() / 8; ++i) acc |= words[i];
  return acc == 0;
}

namespace {

/// lz4-compresses `raw` into `unit`, keeping it only when it is smaller.
void maybeCompress(EncodedUnit& unit) {
  if (unit.data.empty()) return;
  std::vector<std::byte> out(static_cast<std::size_t>(LZ4_compressBound(static_cast<int>(unit.data.size()))));
  int n = LZ4_compress_default(reinterpret_cast<const char*>(unit.data.data()), reinterpret_cast<char*>(out.data()),
                               static_cast<int>(unit.data.size()), static_cast<int>(out.size()));
  if (n <= 0 || static_cast<std::size_t>(n) >= unit.data.size()) return;
  out.resize(static_cast<std::size_t>(n));
  unit.rawSize = static_cast<std::uint32_t>(unit.data.size());
  unit.data = std::move(out);
  unit.compression = wire::Compression::LZ4;
}

}  // namespace

EncodedUnit encodeWhole(std::uint64_t index, std::span<const std::byte> current, bool compress) {
  EncodedUnit unit;
  unit.index = index;
  if (isZeroUnit(current)) {
    unit.encoding = wire::ChunkEncoding::ZERO;
    return unit;
  }
  unit.encoding = wire::ChunkEncoding::WHOLE;
  unit.data.assign(current.begin(), current.end());
  unit.rawSize = static_cast<std::uint32_t>(unit.data.size());
  if (compress) maybeCompress(unit);
  return unit;
}

namespace {

void putVarint(std::vector<std::byte>& out, std::uint32_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<std::byte>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<std::byte>(value));
}

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

bool encodeXorDiff(std::span<const std::byte> current, std::span<const std::byte> reference, std::size_t limit,
                   std::vector<std::byte>& out) {
  out.clear();
  const std::size_t n = current.size();
  std::size_t i = 0;
  while (i < n) {
    std::size_t same = i;
    // Skip equal bytes a word at a time where possible.
    while (same + 8 <= n && std::memcmp(current.data() + same, reference.data() + same, 8) == 0) same += 8;
    while (same < n && current[same] == reference[same]) ++same;
    if (same == n) break;  // a trailing unchanged run is implied
    std::size_t diff = same;
    while (diff < n && current[diff] != reference[diff]) ++diff;
    putVarint(out, static_cast<std::uint32_t>(same - i));
    putVarint(out, static_cast<std::uint32_t>(diff - same));
    out.insert(out.end(), current.begin() + static_cast<std::ptrdiff_t>(same),
               current.begin() + static_cast<std::ptrdiff_t>(diff));
    if (out.size() > limit) return false;
    i = diff;
  }
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
  std::uint32_t count = 0;
  for (std::size_t i = 0; i < current.size(); ++i) count += current[i] != reference[i];
  return count;
}

EncodedUnit encodeDiff(std::uint64_t index, std::span<const std::byte> current, std::span<const std::byte> reference,
                       bool compress) {
  if (isZeroUnit(current)) return encodeWhole(index, current, compress);
  EncodedUnit unit;
  unit.index = index;
  if (!encodeXorDiff(current, reference, kUnitSize - 1, unit.data)) return encodeWhole(index, current, compress);
  unit.encoding = wire::ChunkEncoding::XOR_DIFF;
  unit.rawSize = static_cast<std::uint32_t>(unit.data.size());
  if (compress) maybeCompress(unit);
  return unit;
}

void toWire(const EncodedUnit& unit, wire::Chunk::Builder chunk) {
  chunk.setIndex(unit.index);
  chunk.setEncoding(unit.encoding);
  chunk.setCompression(unit.compression);
  chunk.setRawSize(unit.rawSize);
  chunk.setSameAs(unit.sameAs);
  if (!unit.data.empty()) {
    chunk.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(unit.data.data()), unit.data.size()));
  }
}

void decodeChunk(wire::Chunk::Reader chunk, std::span<const std::byte> reference, std::span<std::byte> out) {
  if (out.size() != kUnitSize) fail("decode buffer of {} bytes, expected {}", out.size(), kUnitSize);
  auto data = chunk.getData();
  std::vector<std::byte> decompressed;
  std::span<const std::byte> payload(reinterpret_cast<const std::byte*>(data.begin()), data.size());
  switch (chunk.getCompression()) {
    case wire::Compression::NONE:
      break;
    case wire::Compression::LZ4: {
      std::uint32_t raw = chunk.getRawSize();
      if (raw == 0 || raw > kUnitSize * 2)
        fail("chunk {}: lz4 raw size {} out of range (1..{})", chunk.getIndex(), raw, kUnitSize * 2);
      decompressed.resize(raw);
      int n = LZ4_decompress_safe(reinterpret_cast<const char*>(payload.data()), reinterpret_cast<char*>(decompressed.data()),
                                  static_cast<int>(payload.size()), static_cast<int>(raw));
      if (n != static_cast<int>(raw)) fail("chunk {}: lz4 data is corrupt", chunk.getIndex());
      payload = decompressed;
      break;
    }
    default:
      fail("chunk {}: unknown compression {}", chunk.getIndex(), static_cast<unsigned>(chunk.getCompression()));
  }
  switch (chunk.getEncoding()) {
    case wire::ChunkEncoding::WHOLE:
      if (payload.size() != kUnitSize)
        fail("chunk {}: whole unit has {} bytes, expected {}", chunk.getIndex(), payload.size(), kUnitSize);
      std::memcpy(out.data(), payload.data(), kUnitSize);
      return;
    case wire::ChunkEncoding::ZERO:
      if (!payload.empty()) fail("chunk {}: zero unit carries {} bytes of data", chunk.getIndex(), payload.size());
      std::memset(out.data(), 0, kUnitSize);
      return;
    case wire::ChunkEncoding::XOR_DIFF:
      if (reference.size() != kUnitSize) fail("chunk {}: xor-diff without a reference unit", chunk.getIndex());
      try {
        decodeXorDiff(payload, reference, out);
      } catch (const Error& e) {
        fail("chunk {}: {}", chunk.getIndex(), e.what());
      }
      return;
    default:
      fail("chunk {}: encoding {} is not supported here", chunk.getIndex(),
           static_cast<unsigned>(chunk.getEncoding()));
  }
}

std::uint64_t payloadBytes(wire::Chunk::Reader chunk) { return chunk.getData().size() + 16; }

}  // namespace vmsync
