// A catch-up merge of checkpoints that carry content references gives the
// image that applying them one by one gives.
#include <capnp/message.h>
#include <gtest/gtest.h>

#include <memory>
#include <random>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint_merge.h"
#include "harvest/unit_hashes.h"
#include "image_units.h"
#include "test_env.h"

namespace vmsync {
namespace {

constexpr std::uint64_t kUnits = 24;

using testing::bytesOf;
using testing::randomUnit;

/// A stored checkpoint: its message and the delta whose payloads it references.
struct Stored {
  ImageDelta delta;
  capnp::MallocMessageBuilder message;
  wire::Checkpoint::Reader reader() { return message.getRoot<wire::Checkpoint>().asReader(); }
};

/// The chain a device makes of its image, one checkpoint per call.
struct Chain {
  testing::TempDir dir;
  ImageFile source{dir / "source", true, kUnits * kUnitSize};
  ImageTracker tracker{source, std::vector<std::uint64_t>(kUnits, zeroUnitHash()), wire::Policy::DIRTY_PREV, true};
  std::vector<std::unique_ptr<Stored>> stored;

  wire::Checkpoint::Reader push(const std::vector<std::uint64_t>& changed) {
    auto& s = *stored.emplace_back(std::make_unique<Stored>());
    const std::uint64_t sequence = stored.size();
    s.delta = sequence == 1 ? tracker.collect(DirtyUnits{.everything = true})
                            : tracker.collect(DirtyUnits{.units = changed});
    auto c = s.message.initRoot<wire::Checkpoint>();
    c.setVmId("vm");
    c.setEpoch(1);
    c.setSequence(sequence);
    c.setBaseSequence(sequence - 1);
    c.setKind(sequence == 1 ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
    toWire(s.delta, ImageDelta{}, c);
    validateCheckpoint(s.reader(), kUnits, 1);
    tracker.acknowledge(s.delta);
    return s.reader();
  }
};

/// The encoding of unit `index` in the memory list of `checkpoint`.
wire::ChunkEncoding encodingOf(wire::Checkpoint::Reader checkpoint, std::uint64_t index) {
  for (auto chunk : checkpoint.getMemory())
    if (chunk.getIndex() == index) return chunk.getEncoding();
  ADD_FAILURE() << "no chunk for unit " << index;
  return wire::ChunkEncoding::WHOLE;
}

class MergeReferences : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937 rng(21);
    for (std::uint64_t i = 0; i < 6; ++i) chain.source.writeUnit(i, randomUnit(rng));
    chain.push({});
    // 2: unit 2's page moves to 10 and unit 2 gets new bytes; unit 3 new bytes.
    chain.source.writeUnit(10, bytesOf(chain.source, 2));
    chain.source.writeUnit(2, randomUnit(rng));
    chain.source.writeUnit(3, randomUnit(rng));
    second = chain.push({2, 3, 10});
    // 3: unit 11 takes unit 10's page (itself a reference in 2), unit 12 unit
    // 3's new bytes of 2, unit 13 unit 4's page (untouched since the full
    // one), and unit 2 changes again.
    chain.source.writeUnit(11, bytesOf(chain.source, 10));
    chain.source.writeUnit(12, bytesOf(chain.source, 3));
    chain.source.writeUnit(13, bytesOf(chain.source, 4));
    chain.source.writeUnit(2, randomUnit(rng));
    third = chain.push({2, 11, 12, 13});
    for (std::uint64_t i : {10, 11, 12, 13})
      ASSERT_EQ(encodingOf(i == 10 ? second : third, i), wire::ChunkEncoding::REFERENCE) << "unit " << i;
  }

  void expectSource(const ImageFile& image, const char* what) {
    for (std::uint64_t i = 0; i < kUnits; ++i)
      ASSERT_EQ(bytesOf(image, i), bytesOf(chain.source, i)) << what << ": unit " << i;
  }

  Chain chain;
  wire::Checkpoint::Reader second, third;
};

TEST_F(MergeReferences, AMergedCatchUpGivesTheImageTheChainGives) {
  testing::TempDir dir;
  ImageFile oneByOne(dir / "one", true, kUnits * kUnitSize), merged(dir / "merged", true, kUnits * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  const auto full = chain.stored[0]->reader();
  applyCheckpoint(full, oneByOne, disk);
  applyCheckpoint(full, merged, disk);
  applyCheckpoint(second, oneByOne, disk);
  applyCheckpoint(third, oneByOne, disk);
  expectSource(oneByOne, "one by one");

  capnp::MallocMessageBuilder out;
  ASSERT_EQ(mergeCheckpoints({second, third}, out.initRoot<wire::Checkpoint>()), "");
  const auto catchUp = out.getRoot<wire::Checkpoint>().asReader();
  validateCheckpoint(catchUp, kUnits, 1);
  // Sources the run did not write stay references to the image before it
  // (units 10 and 11 to unit 2, which the merge also rewrites; 13 to 4); a
  // source the run wrote is that chunk (12: unit 3's bytes of checkpoint 2).
  EXPECT_EQ(encodingOf(catchUp, 10), wire::ChunkEncoding::REFERENCE);
  EXPECT_EQ(encodingOf(catchUp, 11), wire::ChunkEncoding::REFERENCE);
  EXPECT_EQ(encodingOf(catchUp, 13), wire::ChunkEncoding::REFERENCE);
  EXPECT_NE(encodingOf(catchUp, 12), wire::ChunkEncoding::REFERENCE);
  applyCheckpoint(catchUp, merged, disk);
  expectSource(merged, "merged");
}

TEST_F(MergeReferences, AMergeFromTheFullCheckpointHasNoReferences) {
  testing::TempDir dir;
  ImageFile image(dir / "image", true, kUnits * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  capnp::MallocMessageBuilder out;
  ASSERT_EQ(mergeCheckpoints({chain.stored[0]->reader(), second, third}, out.initRoot<wire::Checkpoint>()), "");
  const auto catchUp = out.getRoot<wire::Checkpoint>().asReader();
  ASSERT_EQ(catchUp.getKind(), wire::CheckpointKind::FULL);
  for (auto chunk : catchUp.getMemory())
    EXPECT_NE(chunk.getEncoding(), wire::ChunkEncoding::REFERENCE) << "unit " << chunk.getIndex();
  validateCheckpoint(catchUp, kUnits, 1);
  applyCheckpoint(catchUp, image, disk);
  expectSource(image, "merged from the full checkpoint");
}

TEST_F(MergeReferences, AReferenceThatDoesNotMatchTheRunIsRefusedNamingTheUnit) {
  // A checkpoint after the third whose unit 20 names unit 12 with a hash
  // that is not the one the run left there.
  capnp::MallocMessageBuilder bad;
  auto c = bad.initRoot<wire::Checkpoint>();
  c.setVmId("vm");
  c.setEpoch(1);
  c.setSequence(4);
  c.setBaseSequence(3);
  c.setKind(wire::CheckpointKind::INCREMENTAL);
  std::array<std::byte, kReferencePayload> room;
  const ChunkView reference =
      encodeReferenceInto(20, UnitReference{12, hashUnit(chain.source.unit(12)) ^ 1}, room);
  toWire(reference, c.initMemory(1)[0]);
  c.initDisk(0);
  capnp::MallocMessageBuilder out;
  const std::string why = mergeCheckpoints({second, third, c.asReader()}, out.initRoot<wire::Checkpoint>());
  EXPECT_NE(why.find("unit 20 refers to unit 12"), std::string::npos) << why;
}

}  // namespace
}  // namespace vmsync
