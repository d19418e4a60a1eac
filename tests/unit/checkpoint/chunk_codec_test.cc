#include "checkpoint/chunk_codec.h"

#include <capnp/message.h>
#include <gtest/gtest.h>

#include <random>

#include "base/error.h"
#include "base/units.h"

namespace vmsync {
namespace {

std::vector<std::byte> randomUnit(std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> unit(kUnitSize);
  for (auto& b : unit) b = static_cast<std::byte>(rng());
  return unit;
}

/// Encodes `unit`, puts it in a wire chunk and decodes it again.
std::vector<std::byte> roundTrip(const std::vector<std::byte>& unit, bool compress, EncodedUnit* encodedOut = nullptr) {
  EncodedUnit encoded = encodeWhole(7, unit, compress);
  if (encodedOut) *encodedOut = encoded;
  capnp::MallocMessageBuilder message;
  auto chunk = message.initRoot<wire::Chunk>();
  toWire(encoded, chunk);
  std::vector<std::byte> out(kUnitSize, std::byte{0xAA});
  decodeChunk(chunk.asReader(), {}, out);
  return out;
}

TEST(ChunkCodec, RandomUnitRoundTripsWithAndWithoutLz4) {
  auto unit = randomUnit(1);
  EXPECT_EQ(roundTrip(unit, false), unit);
  EncodedUnit encoded;
  EXPECT_EQ(roundTrip(unit, true, &encoded), unit);
  // Random bytes do not compress: the payload stays whole.
  EXPECT_EQ(encoded.compression, wire::Compression::NONE);
}

TEST(ChunkCodec, ZeroUnitIsEncodedWithoutPayload) {
  std::vector<std::byte> unit(kUnitSize);
  EncodedUnit encoded;
  EXPECT_EQ(roundTrip(unit, true, &encoded), unit);
  EXPECT_EQ(encoded.encoding, wire::ChunkEncoding::ZERO);
  EXPECT_TRUE(encoded.data.empty());
}

TEST(ChunkCodec, SparseUnitCompresses) {
  std::vector<std::byte> unit(kUnitSize);
  for (std::size_t i = 0; i < kUnitSize; i += 512) unit[i] = std::byte{0x5A};
  EncodedUnit encoded;
  EXPECT_EQ(roundTrip(unit, true, &encoded), unit);
  EXPECT_EQ(encoded.compression, wire::Compression::LZ4);
  EXPECT_LT(encoded.data.size(), kUnitSize / 4);
}

TEST(ChunkCodec, RejectsTruncatedWholeUnit) {
  capnp::MallocMessageBuilder message;
  auto chunk = message.initRoot<wire::Chunk>();
  chunk.setIndex(3);
  chunk.setEncoding(wire::ChunkEncoding::WHOLE);
  std::vector<kj::byte> shortData(100);
  chunk.setData(kj::arrayPtr(shortData.data(), shortData.size()));
  std::vector<std::byte> out(kUnitSize);
  EXPECT_THROW(decodeChunk(chunk.asReader(), {}, out), Error);
}

TEST(ChunkCodec, RejectsGarbledLz4) {
  auto unit = std::vector<std::byte>(kUnitSize);
  for (std::size_t i = 0; i < kUnitSize; i += 64) unit[i] = std::byte{1};
  EncodedUnit encoded = encodeWhole(1, unit, true);
  ASSERT_EQ(encoded.compression, wire::Compression::LZ4);
  for (auto& b : encoded.data) b = std::byte{0xFF};
  capnp::MallocMessageBuilder message;
  auto chunk = message.initRoot<wire::Chunk>();
  toWire(encoded, chunk);
  std::vector<std::byte> out(kUnitSize);
  EXPECT_THROW(decodeChunk(chunk.asReader(), {}, out), Error);
}

TEST(ChunkCodec, RejectsOversizedRawSize) {
  capnp::MallocMessageBuilder message;
  auto chunk = message.initRoot<wire::Chunk>();
  chunk.setEncoding(wire::ChunkEncoding::WHOLE);
  chunk.setCompression(wire::Compression::LZ4);
  chunk.setRawSize(1u << 30);
  std::vector<std::byte> out(kUnitSize);
  EXPECT_THROW(decodeChunk(chunk.asReader(), {}, out), Error);
}

}  // namespace
}  // namespace vmsync
