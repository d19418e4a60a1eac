// Content references: a unit whose bytes the receiver holds at another index
// travels as a reference to it, checked by the receiver's hash before use.
#include <capnp/message.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/content_index.h"
#include "base/error.h"
#include "harvest/unit_hashes.h"
#include "image_units.h"
#include "test_env.h"

namespace vmsync {
namespace {

constexpr std::uint64_t kUnits = 32;

using testing::bytesOf;
using testing::randomUnit;

/// A sender (its image and tracker) and a receiver that applies every
/// checkpoint, as a standby does.
struct Pair {
  testing::TempDir dir;
  ImageFile source{dir / "source", true, kUnits * kUnitSize};
  ImageFile receiver{dir / "receiver", true, kUnits * kUnitSize};
  ImageFile disk{dir / "disk", true, kUnitSize};
  ImageTracker tracker;
  std::uint64_t sequence = 0;

  explicit Pair(wire::Policy policy, bool compress = true)
      : tracker(source, std::vector<std::uint64_t>(kUnits, zeroUnitHash()), policy, compress) {}

  /// The next checkpoint of `changed` (every unit for the first), built but
  /// not applied; `delta` keeps its payloads.
  void build(const std::vector<std::uint64_t>& changed, ImageDelta& delta, capnp::MallocMessageBuilder& message) {
    ++sequence;
    delta = sequence == 1 ? tracker.collect(DirtyUnits{.everything = true})
                          : tracker.collect(DirtyUnits{.units = changed});
    auto c = message.initRoot<wire::Checkpoint>();
    c.setVmId("vm");
    c.setSequence(sequence);
    c.setBaseSequence(sequence - 1);
    c.setKind(sequence == 1 ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
    toWire(delta, ImageDelta{}, c);
  }

  /// Builds, applies and acknowledges the next checkpoint; returns its delta.
  ImageDelta step(const std::vector<std::uint64_t>& changed) {
    ImageDelta delta;
    capnp::MallocMessageBuilder message;
    build(changed, delta, message);
    auto reader = message.getRoot<wire::Checkpoint>().asReader();
    validateCheckpoint(reader, kUnits, 1);
    applyCheckpoint(reader, receiver, disk);
    tracker.acknowledge(delta);
    return delta;
  }

  void expectEqual(const char* when) {
    for (std::uint64_t i = 0; i < kUnits; ++i)
      ASSERT_EQ(bytesOf(receiver, i), bytesOf(source, i)) << when << ": unit " << i;
  }
};

/// The chunk of unit `index` in `delta`.
const ChunkView& chunkOf(const ImageDelta& delta, std::uint64_t index) {
  for (const ChunkView& unit : delta.units)
    if (unit.index == index) return unit;
  throw Error("no chunk for unit " + std::to_string(index));
}

UnitReference referenceIn(const ChunkView& chunk) {
  return referenceOf(chunk.index, chunk.compression, chunk.data);
}

TEST(ContentIndex, FindsEveryHashAfterErasesInACrowdedRun) {
  // Every hash has the same low bits: all of them share one home slot, so
  // each lookup walks the run, and each erase must shift the rest back.
  std::vector<std::uint64_t> hashes(200);
  for (std::uint64_t i = 0; i < hashes.size(); ++i) hashes[i] = (i + 1) << 20;
  hashes[7] = 0x1234;  // the zero unit's hash stands in for zeros here
  ContentIndex index(0x1234);
  index.rebuild(hashes);
  EXPECT_EQ(index.size(), 199u);
  EXPECT_FALSE(index.find(0x1234, hashes)) << "the zero hash is never indexed";
  for (std::uint64_t i = 0; i < hashes.size(); i += 3) index.erase(i, hashes);
  for (std::uint64_t i = 0; i < hashes.size(); ++i) {
    if (i == 7) continue;
    const auto found = index.find(hashes[i], hashes);
    if (i % 3 == 0) {
      EXPECT_FALSE(found) << "unit " << i << " was erased";
    } else {
      ASSERT_TRUE(found) << "unit " << i;
      EXPECT_EQ(*found, i);
    }
  }
  // A unit whose content another unit holds first is not its holder: erasing
  // it leaves the holder.
  hashes[10] = hashes[11];
  index.erase(10, hashes);
  ASSERT_TRUE(index.find(hashes[11], hashes));
  EXPECT_EQ(*index.find(hashes[11], hashes), 11u);
}

class MovedPage : public ::testing::TestWithParam<wire::Policy> {};

TEST_P(MovedPage, TravelsAsAReferenceAndAppliesByteExact) {
  Pair pair(GetParam());
  std::mt19937 rng(11);
  for (std::uint64_t i = 0; i < 8; ++i) pair.source.writeUnit(i, randomUnit(rng));
  pair.step({});
  pair.expectEqual("full");

  // Unit 3's page moves to unit 12, and unit 3 gets new bytes in the same
  // checkpoint; units 5 and 6 swap. The receiver must read every source
  // before it writes any unit.
  const auto moved = bytesOf(pair.source, 3);
  const auto five = bytesOf(pair.source, 5), six = bytesOf(pair.source, 6);
  pair.source.writeUnit(12, moved);
  pair.source.writeUnit(3, randomUnit(rng));
  pair.source.writeUnit(5, six);
  pair.source.writeUnit(6, five);
  const ImageDelta delta = pair.step({3, 5, 6, 12});
  pair.expectEqual("after the move");

  const ChunkView& twelve = chunkOf(delta, 12);
  ASSERT_EQ(twelve.encoding, wire::ChunkEncoding::REFERENCE);
  EXPECT_EQ(referenceIn(twelve).source, 3u);
  EXPECT_EQ(referenceIn(twelve).hash, hashUnit(moved));
  ASSERT_EQ(chunkOf(delta, 5).encoding, wire::ChunkEncoding::REFERENCE);
  EXPECT_EQ(referenceIn(chunkOf(delta, 5)).source, 6u);
  ASSERT_EQ(chunkOf(delta, 6).encoding, wire::ChunkEncoding::REFERENCE);
  EXPECT_EQ(referenceIn(chunkOf(delta, 6)).source, 5u);
  EXPECT_NE(chunkOf(delta, 3).encoding, wire::ChunkEncoding::REFERENCE) << "new bytes travel themselves";
  EXPECT_EQ(delta.references, 3u);
  // Random pages do not compress: each reference saves a whole unit but its 16 bytes.
  EXPECT_EQ(delta.referenceSavedBytes, 3 * (kUnitSize - kReferencePayload));
  EXPECT_LT(delta.encodedBytes, 2 * kUnitSize) << "one new page and three references";
}

TEST_P(MovedPage, TravelsWholeWhenReferencesAreOff) {
  Pair pair(GetParam());
  pair.tracker.setContentReferences(false);
  std::mt19937 rng(12);
  for (std::uint64_t i = 0; i < 4; ++i) pair.source.writeUnit(i, randomUnit(rng));
  pair.step({});
  pair.source.writeUnit(20, bytesOf(pair.source, 2));
  const ImageDelta delta = pair.step({20});
  pair.expectEqual("after the copy");
  EXPECT_NE(chunkOf(delta, 20).encoding, wire::ChunkEncoding::REFERENCE);
  EXPECT_EQ(delta.references, 0u);
}

INSTANTIATE_TEST_SUITE_P(PrevPolicies, MovedPage,
                         ::testing::Values(wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV));

TEST(ContentReference, APageThatComesBackTravelsAsAReference) {
  Pair pair(wire::Policy::DIRTY_PREV);
  std::mt19937 rng(13);
  const auto page = randomUnit(rng);
  pair.source.writeUnit(1, page);
  pair.source.writeUnit(7, page);  // the same page twice (a page-cache page and its copy)
  pair.step({});
  // Unit 7 is reused for other bytes, ...
  pair.source.writeUnit(7, randomUnit(rng));
  ImageDelta delta = pair.step({7});
  EXPECT_NE(chunkOf(delta, 7).encoding, wire::ChunkEncoding::REFERENCE);
  // ... and then holds the page again: the receiver still has it at unit 1.
  pair.source.writeUnit(7, page);
  delta = pair.step({7});
  pair.expectEqual("after the page came back");
  ASSERT_EQ(chunkOf(delta, 7).encoding, wire::ChunkEncoding::REFERENCE);
  EXPECT_EQ(referenceIn(chunkOf(delta, 7)).source, 1u);

  // A content the receiver held only at units that changed since is gone
  // from it: that page travels itself.
  pair.source.writeUnit(1, randomUnit(rng));
  pair.source.writeUnit(7, randomUnit(rng));
  pair.step({1, 7});
  pair.source.writeUnit(9, page);
  delta = pair.step({9});
  pair.expectEqual("after the page came back to a third unit");
  EXPECT_NE(chunkOf(delta, 9).encoding, wire::ChunkEncoding::REFERENCE) << "no unit of the receiver holds it now";
}

TEST(ContentReference, OrigPoliciesSendNone) {
  Pair pair(wire::Policy::DIRTY_ORIG);
  EXPECT_FALSE(pair.tracker.contentReferences());
  pair.tracker.setContentReferences(true);
  EXPECT_FALSE(pair.tracker.contentReferences()) << "a receiver may skip checkpoints under Orig";
}

TEST(ContentReference, AMismatchedSourceIsRefusedNamingTheUnitAndNothingIsWritten) {
  Pair pair(wire::Policy::DIRTY_PREV);
  std::mt19937 rng(14);
  for (std::uint64_t i = 0; i < 6; ++i) pair.source.writeUnit(i, randomUnit(rng));
  pair.step({});
  pair.source.writeUnit(17, bytesOf(pair.source, 4));
  pair.source.writeUnit(2, randomUnit(rng));
  ImageDelta delta;
  capnp::MallocMessageBuilder message;
  pair.build({2, 17}, delta, message);
  ASSERT_EQ(chunkOf(delta, 17).encoding, wire::ChunkEncoding::REFERENCE);
  auto reader = message.getRoot<wire::Checkpoint>().asReader();

  // The receiver's unit 4 is not what the sender holds it to be.
  auto damaged = bytesOf(pair.receiver, 4);
  damaged[100] ^= std::byte{1};
  pair.receiver.writeUnit(4, damaged);
  std::vector<std::vector<std::byte>> before;
  for (std::uint64_t i = 0; i < kUnits; ++i) before.push_back(bytesOf(pair.receiver, i));
  try {
    applyCheckpoint(reader, pair.receiver, pair.disk);
    FAIL() << "a reference whose source does not match was used";
  } catch (const ReferenceMismatch& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("unit 17 refers to unit 4"), std::string::npos) << what;
  }
  for (std::uint64_t i = 0; i < kUnits; ++i)
    EXPECT_EQ(bytesOf(pair.receiver, i), before[i]) << "unit " << i << " was written by a refused checkpoint";

  // Once the unit is what the chain says again (the server's resync), the
  // same checkpoint applies.
  pair.receiver.writeUnit(4, bytesOf(pair.source, 4));
  applyCheckpoint(reader, pair.receiver, pair.disk);
  pair.expectEqual("after the resync");
}

TEST(ContentReference, MalformedReferencesAreRefusedByValidation) {
  Pair pair(wire::Policy::DIRTY_PREV);
  std::mt19937 rng(15);
  pair.source.writeUnit(5, randomUnit(rng));
  pair.step({});
  pair.source.writeUnit(1, bytesOf(pair.source, 5));
  ImageDelta delta;
  capnp::MallocMessageBuilder message;
  pair.build({1}, delta, message);
  auto root = message.getRoot<wire::Checkpoint>();
  ASSERT_EQ(root.getMemory()[0].getEncoding(), wire::ChunkEncoding::REFERENCE);
  EXPECT_NO_THROW(validateCheckpoint(root.asReader(), kUnits, 1));
  // A source outside the image (unit 1 itself is inside one of 4 units).
  try {
    validateCheckpoint(root.asReader(), 4, 1);
    FAIL() << "a reference to unit 5 of an image of 4 units was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("refers to unit 5"), std::string::npos) << e.what();
  }
  // In a full checkpoint, which starts from an empty image.
  root.setKind(wire::CheckpointKind::FULL);
  EXPECT_THROW(validateCheckpoint(root.asReader(), kUnits, 1), Error);
  root.setKind(wire::CheckpointKind::INCREMENTAL);
  // Compressed, or of another length.
  root.getMemory()[0].setCompression(wire::Compression::LZ4);
  EXPECT_THROW(validateCheckpoint(root.asReader(), kUnits, 1), Error);
  EXPECT_THROW(applyCheckpoint(root.asReader(), pair.receiver, pair.disk), Error);
  root.getMemory()[0].setCompression(wire::Compression::NONE);
  root.getMemory()[0].setBlobSize(kReferencePayload - 1);
  EXPECT_THROW(validateCheckpoint(root.asReader(), kUnits, 1), Error);
}

// A standby's journal replays a checkpoint after a crash. A reference whose
// source the interrupted apply had overwritten already (two units swapped)
// cannot be followed again: it is refused, never written wrong.
TEST(ContentReference, AReplayAfterTheSourceWasOverwrittenIsRefusedNotWrong) {
  Pair pair(wire::Policy::DIRTY_PREV);
  std::mt19937 rng(16);
  for (std::uint64_t i = 0; i < 4; ++i) pair.source.writeUnit(i, randomUnit(rng));
  pair.step({});
  const auto one = bytesOf(pair.source, 1), two = bytesOf(pair.source, 2);
  pair.source.writeUnit(1, two);
  pair.source.writeUnit(2, one);
  ImageDelta delta;
  capnp::MallocMessageBuilder message;
  pair.build({1, 2}, delta, message);
  auto reader = message.getRoot<wire::Checkpoint>().asReader();
  // The interrupted apply wrote unit 1 only.
  pair.receiver.writeUnit(1, two);
  EXPECT_THROW(applyCheckpoint(reader, pair.receiver, pair.disk), ReferenceMismatch);
  EXPECT_EQ(bytesOf(pair.receiver, 2), two) << "unit 2 was written from a source that no longer matched";
}

}  // namespace
}  // namespace vmsync
