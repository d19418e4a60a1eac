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
    default:
      fail("chunk {}: encoding {} is not supported here", chunk.getIndex(),
           static_cast<unsigned>(chunk.getEncoding()));
  }
}

std::uint64_t payloadBytes(wire::Chunk::Reader chunk) { return chunk.getData().size() + 16; }

}  // namespace vmsync
