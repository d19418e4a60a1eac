// Applying a checkpoint: every kind of chunk lands where it belongs, and a
// chunk that names what the image does not hold (a unit past its end, a
// repeated unit, bytes outside the blobs, a corrupt payload) is refused
// before anything is written, at a cost bounded by the list, not the image.
#include <capnp/message.h>
#include <capnp/schema.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>
#include <lz4.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "base/error.h"
#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "harvest/unit_hashes.h"
#include "test_env.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

/// A checkpoint with one blob of 8 bytes and one memory chunk, which `edit` sets up.
template <typename Edit>
void applyWithBlobChunk(Edit edit, const std::string& expected) {
  TempDir dir;
  ImageFile ram((dir / "ram"), true, 4 * kUnitSize);
  ImageFile disk((dir / "disk"), true, kUnitSize);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  checkpoint.initBlobs(1).set(0, kj::StringPtr("12345678").asBytes());
  auto chunk = checkpoint.initMemory(1)[0];
  chunk.setIndex(1);
  chunk.setEncoding(wire::ChunkEncoding::XOR_DIFF);
  chunk.setRawSize(2);
  edit(chunk);
  checkpoint.initDisk(0);
  try {
    validateCheckpoint(checkpoint.asReader(), ram.units(), disk.units());
    ADD_FAILURE() << "validation accepted it";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
  try {
    applyCheckpoint(checkpoint.asReader(), ram, disk);
    ADD_FAILURE() << "apply accepted it";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
  EXPECT_EQ(hashAllUnits(ram), hashAllUnits(ImageFile((dir / "zeros"), true, 4 * kUnitSize)));
}

TEST(PayloadBlobs, AChunkNamingBytesOutsideTheBlobsIsRefusedWithWhatItNamed) {
  applyWithBlobChunk([](auto c) { c.setBlob(2); },
                     "memory chunk 1: names blob 2, but the checkpoint has 1");
  applyWithBlobChunk([](auto c) { c.setBlob(1), c.setBlobOffset(4), c.setBlobSize(8); },
                     "memory chunk 1: names bytes 4..12 of blob 1, which has 8");
  applyWithBlobChunk(
      [](auto c) { c.setBlob(1), c.setBlobOffset(0xffffffff), c.setBlobSize(0xffffffff); },
      "names bytes 4294967295..8589934590 of blob 1");
  applyWithBlobChunk([](auto c) { c.setBlob(1), c.setBlobSize(2), c.initData(2); },
                     "carries 2 bytes of its own and names blob 1 too");
  applyWithBlobChunk([](auto c) { c.setBlobSize(2); }, "blob offset or size given, but no blob");
}

TEST(ApplyCheckpoint, OutOfRangeChunkIsRejectedAndNothingIsWritten) {
  TempDir dir;
  ImageFile ram((dir / "ram"), true, 4 * kUnitSize);
  ImageFile disk((dir / "disk"), true, 4 * kUnitSize);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  auto memory = checkpoint.initMemory(2);
  std::vector<std::byte> ones(kUnitSize, std::byte{1});
  toWire(encodeWhole(0, ones, false), memory[0]);
  toWire(encodeWhole(9, ones, false), memory[1]);
  checkpoint.initDisk(0);
  EXPECT_THROW(applyCheckpoint(checkpoint.asReader(), ram, disk), Error);
  EXPECT_EQ(hashUnit(ram.unit(0)), zeroUnitHash()) << "the valid first chunk must not have been applied";
}

/// A list of every kind of chunk, out of index order: whole and zero units sent
/// as they are (applied from the message), lz4 and XOR-diff ones (decoded),
/// and SAME_AS references to either kind. Some indexes are consecutive, so
/// their writes go out together.
void fillMixedList(capnp::List<wire::Chunk>::Builder list, const std::vector<std::vector<std::byte>>& units,
                   std::span<const std::byte> reference) {
  toWire(encodeWhole(5, units[5], false), list[0]);                        // whole, in place
  toWire(encodeWhole(6, units[6], true), list[1]);                         // lz4
  toWire(encodeWhole(2, units[2], false), list[2]);                        // zero, in place
  toWire(encodeDiff(7, units[7], reference, false), list[3]);              // xor-diff
  EncodedUnit same;
  same.index = 3;
  same.encoding = wire::ChunkEncoding::SAME_AS;
  same.sameAs = 0;                                                         // = chunk 0 (in place)
  toWire(same, list[4]);
  same.index = 1;
  same.sameAs = 3;                                                         // = chunk 3 (decoded)
  toWire(same, list[5]);
}

TEST(ApplyCheckpoint, EveryKindOfChunkLandsWhereItBelongs) {
  TempDir dir;
  ImageFile ram((dir / "ram"), true, 8 * kUnitSize);
  ImageFile disk((dir / "disk"), true, kUnitSize);
  std::mt19937 rng(31);
  std::vector<std::vector<std::byte>> units(8, std::vector<std::byte>(kUnitSize));
  for (std::size_t u : {5, 6, 7})
    for (auto& b : units[u]) b = static_cast<std::byte>(u == 6 ? rng() % 3 : rng());
  // Unit 7 differs from the receiver's (zero) unit in a few bytes only.
  std::fill(units[7].begin(), units[7].end(), std::byte{0});
  for (std::size_t i : {0, 100, 4095}) units[7][i] = std::byte{9};
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  fillMixedList(checkpoint.initMemory(6), units, ram.unit(7));
  checkpoint.initDisk(0);
  ASSERT_EQ(checkpoint.asReader().getMemory()[3].getEncoding(), wire::ChunkEncoding::XOR_DIFF);
  ASSERT_EQ(checkpoint.asReader().getMemory()[1].getCompression(), wire::Compression::LZ4);
  ApplyStats stats = applyCheckpoint(checkpoint.asReader(), ram, disk);
  EXPECT_EQ(stats.memoryUnits, 6u);
  std::vector<std::vector<std::byte>> expected = units;
  expected[3] = units[5];
  expected[1] = units[7];
  for (std::uint64_t u = 0; u < 8; ++u)
    EXPECT_TRUE(std::equal(ram.unit(u).begin(), ram.unit(u).end(), expected[u].begin())) << "unit " << u;
}

TEST(ApplyCheckpoint, CorruptChunkAfterGoodOnesIsRejectedAndNothingIsWritten) {
  TempDir dir;
  ImageFile ram((dir / "ram"), true, 8 * kUnitSize);
  ImageFile disk((dir / "disk"), true, kUnitSize);
  std::vector<std::vector<std::byte>> units(8, std::vector<std::byte>(kUnitSize, std::byte{4}));
  units[2].assign(kUnitSize, std::byte{0});
  units[7][0] = std::byte{0};
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  auto list = checkpoint.initMemory(7);
  fillMixedList(list, units, ram.unit(7));
  // Chunk 6: lz4 that does not decompress to its raw size.
  EncodedUnit bad = encodeWhole(0, units[5], true);
  ASSERT_EQ(bad.compression, wire::Compression::LZ4);
  bad.data.resize(bad.data.size() / 2);
  toWire(bad, list[6]);
  checkpoint.initDisk(0);
  auto before = hashAllUnits(ram);
  try {
    applyCheckpoint(checkpoint.asReader(), ram, disk);
    ADD_FAILURE() << "a corrupt chunk was applied";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("memory chunk 0: lz4 data is corrupt"), std::string::npos) << e.what();
  }
  EXPECT_EQ(hashAllUnits(ram), before) << "nothing may be written before every chunk is checked";
}

TEST(ApplyCheckpoint, MoreChunksThanUnitsIsRejectedBeforeDecoding) {
  TempDir dir;
  ImageFile ram((dir / "ram"), true, 2 * kUnitSize);
  ImageFile disk((dir / "disk"), true, 2 * kUnitSize);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  auto memory = checkpoint.initMemory(3);
  for (unsigned i = 0; i < 3; ++i) memory[i].setEncoding(wire::ChunkEncoding::ZERO);
  checkpoint.initDisk(0);
  try {
    applyCheckpoint(checkpoint.asReader(), ram, disk);
    FAIL() << "accepted 3 chunks for 2 units";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 chunks"), std::string::npos) << e.what();
  }
}

/// A memory list of zero chunks naming `indexes`, and an empty disk list.
void zeroChunks(wire::Checkpoint::Builder checkpoint, const std::vector<std::uint64_t>& indexes) {
  auto memory = checkpoint.initMemory(static_cast<unsigned>(indexes.size()));
  for (unsigned i = 0; i < indexes.size(); ++i) {
    memory[i].setIndex(indexes[i]);
    memory[i].setEncoding(wire::ChunkEncoding::ZERO);
  }
  checkpoint.initDisk(0);
}

std::string refusal(const std::function<void()>& run) {
  try {
    run();
  } catch (const Error& e) {
    return e.what();
  }
  return "accepted";
}

// The earliest chunk that repeats a unit is the one named, whether the
// check keeps a bitmap of the image (few units per chunk) or sorts the
// indexes (an image far larger than the list).
TEST(ApplyCheckpoint, TheFirstChunkThatRepeatsAUnitIsNamedForSmallAndLargeImages) {
  TempDir dir;
  for (std::uint64_t units : {std::uint64_t{16}, std::uint64_t{1} << 16}) {
    ImageFile ram(dir / ("ram" + std::to_string(units)), true, units * kUnitSize);
    ImageFile disk(dir / ("disk" + std::to_string(units)), true, kUnitSize);
    for (const auto& [indexes, expected] :
         std::vector<std::pair<std::vector<std::uint64_t>, std::string>>{
             {{5, 7, 5, 7}, "memory chunk 2 names unit 5 a second time"},
             {{9, 3, 3, 9}, "memory chunk 2 names unit 3 a second time"},
             {{1, 2, 3, 4, 2, 1}, "memory chunk 4 names unit 2 a second time"}}) {
      capnp::MallocMessageBuilder message;
      auto checkpoint = message.initRoot<wire::Checkpoint>();
      zeroChunks(checkpoint, indexes);
      EXPECT_EQ(refusal([&] { applyCheckpoint(checkpoint.asReader(), ram, disk); }), expected)
          << units << " units";
      EXPECT_EQ(refusal([&] { validateCheckpoint(checkpoint.asReader(), ram.units(), disk.units()); }), expected)
          << units << " units";
    }
    capnp::MallocMessageBuilder message;
    auto checkpoint = message.initRoot<wire::Checkpoint>();
    zeroChunks(checkpoint, {0, 15, 3});
    EXPECT_EQ(refusal([&] { applyCheckpoint(checkpoint.asReader(), ram, disk); }), "accepted") << units << " units";
  }
}

// A message of a few words may claim an image of 2^50 units (4 EiB). The
// server validates a push against the spec's sizes: a bitmap of those units
// would be 128 TiB, so the check must cost what the list costs.
TEST(ApplyCheckpoint, ValidatingAgainstAHugeImageCostsWhatTheListCosts) {
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  constexpr std::uint64_t kHuge = std::uint64_t{1} << 50;
  zeroChunks(checkpoint, {kHuge - 1, 0, kHuge - 1});
  EXPECT_EQ(refusal([&] { validateCheckpoint(checkpoint.asReader(), kHuge, 1); }),
            "memory chunk 2 names unit 1125899906842623 a second time");
  capnp::MallocMessageBuilder good;
  auto fine = good.initRoot<wire::Checkpoint>();
  zeroChunks(fine, {kHuge - 1, 0});
  EXPECT_EQ(refusal([&] { validateCheckpoint(fine.asReader(), kHuge, 1); }), "accepted");
}

// A pointer in a slot the schema does not name (a field of a newer version)
// is not read by a field walk, but copying the message follows it. One that
// leaves the message makes the checkpoint malformed.
TEST(CheckWellFormed, APointerOutOfTheMessageInASlotTheSchemaDoesNotNameIsRefused) {
  const auto proto = capnp::Schema::from<wire::Checkpoint>().getProto().getStruct();
  const std::uint64_t dataWords = proto.getDataWordCount();
  const std::uint64_t pointers = proto.getPointerCount() + 1;  // one slot past the schema's
  auto message = [&](std::uint64_t extra) {
    std::vector<capnp::word> words(1 + dataWords + pointers);
    auto* raw = reinterpret_cast<std::uint64_t*>(words.data());
    raw[0] = (dataWords << 32) | (pointers << 48);  // root: a struct right after this pointer
    raw[dataWords + pointers] = extra;              // the unnamed slot
    return words;
  };
  // A struct pointer with offset 0 and one data word: after the last slot,
  // past the end of the message. Null in the unnamed slot is fine.
  const std::uint64_t outside = std::uint64_t{1} << 32;
  for (std::uint64_t extra : {std::uint64_t{0}, outside}) {
    auto words = message(extra);
    kj::ArrayPtr<const capnp::word> segments[] = {kj::arrayPtr(words.data(), words.size())};
    capnp::SegmentArrayMessageReader reader(kj::arrayPtr(segments, 1));
    auto checkpoint = reader.getRoot<wire::Checkpoint>();
    std::string result = refusal([&] { checkWellFormed(checkpoint); });
    if (extra == 0)
      EXPECT_EQ(result, "accepted");
    else
      EXPECT_NE(result.find("is not a well-formed message"), std::string::npos) << result;
  }
}

TEST(ImageDigest, DiffersWhenOneUnitDiffers) {
  std::vector<std::uint64_t> ram{1, 2, 3}, disk{4, 5};
  auto a = imageDigest(ram, disk);
  disk[1] = 6;
  EXPECT_NE(a, imageDigest(ram, disk));
}

}  // namespace
}  // namespace vmsync
