#include <capnp/message.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint_merge.h"
#include "harvest/unit_hashes.h"
#include "test_env.h"

namespace vmsync {
namespace {

struct Built {
  capnp::MallocMessageBuilder message;
  wire::Checkpoint::Builder root = message.initRoot<wire::Checkpoint>();
};

/// A checkpoint whose memory chunk for each index holds one byte `tag`.
void fill(Built& b, std::uint64_t sequence, wire::CheckpointKind kind, std::vector<std::uint64_t> pages,
          std::uint8_t tag) {
  b.root.setVmId("vm");
  b.root.setEpoch(1);
  b.root.setSequence(sequence);
  b.root.setBaseSequence(sequence - 1);
  b.root.setKind(kind);
  auto memory = b.root.initMemory(static_cast<unsigned>(pages.size()));
  for (unsigned i = 0; i < pages.size(); ++i) {
    memory[i].setIndex(pages[i]);
    memory[i].setEncoding(wire::ChunkEncoding::WHOLE);
    auto data = memory[i].initData(1);
    data[0] = tag;
  }
  auto disk = b.root.initDisk(1);
  disk[0].setIndex(sequence);
  disk[0].setEncoding(wire::ChunkEncoding::ZERO);
}

TEST(ServerMerge, KeepsOnlyTheNewestChunkOfEachUnitAndTheFinalState) {
  Built a, b, c;
  fill(a, 4, wire::CheckpointKind::INCREMENTAL, {1, 2}, 0xa);
  fill(b, 5, wire::CheckpointKind::INCREMENTAL, {2, 3}, 0xb);
  fill(c, 6, wire::CheckpointKind::FINAL, {3}, 0xc);
  c.root.setDeviceState(kj::StringPtr("state").asBytes());
  c.root.setImageDigest(kj::StringPtr("digest").asBytes());
  capnp::MallocMessageBuilder out;
  auto merged = out.initRoot<wire::Checkpoint>();
  ASSERT_EQ(mergeCheckpoints({a.root.asReader(), b.root.asReader(), c.root.asReader()}, merged), "");
  EXPECT_EQ(merged.getBaseSequence(), 3u);
  EXPECT_EQ(merged.getSequence(), 6u);
  EXPECT_EQ(merged.getKind(), wire::CheckpointKind::FINAL);
  EXPECT_EQ(kj::str(merged.getDeviceState().asChars()), "state");
  EXPECT_EQ(kj::str(merged.getImageDigest().asChars()), "digest");
  ASSERT_EQ(merged.getMemory().size(), 3u);
  EXPECT_EQ(merged.getMemory()[0].getData()[0], 0xa);  // page 1 from 4
  EXPECT_EQ(merged.getMemory()[1].getData()[0], 0xb);  // page 2 from 5
  EXPECT_EQ(merged.getMemory()[2].getData()[0], 0xc);  // page 3 from 6
  EXPECT_EQ(merged.getDisk().size(), 3u);
}

TEST(ServerMerge, ADuplicateChunkStandsForTheChunkItNames) {
  Built a, b;
  fill(a, 4, wire::CheckpointKind::INCREMENTAL, {1, 7}, 0xa);
  a.root.getMemory()[1].setEncoding(wire::ChunkEncoding::SAME_AS);  // page 7 = page 1's bytes
  a.root.getMemory()[1].setSameAs(0);
  a.root.getMemory()[1].setData(nullptr);
  fill(b, 5, wire::CheckpointKind::INCREMENTAL, {1}, 0xb);
  capnp::MallocMessageBuilder out;
  auto merged = out.initRoot<wire::Checkpoint>();
  ASSERT_EQ(mergeCheckpoints({a.root.asReader(), b.root.asReader()}, merged), "");
  ASSERT_EQ(merged.getMemory().size(), 2u);
  EXPECT_EQ(merged.getMemory()[0].getIndex(), 1u);
  EXPECT_EQ(merged.getMemory()[0].getData()[0], 0xb);  // page 1, newest
  EXPECT_EQ(merged.getMemory()[1].getIndex(), 7u);     // page 7 keeps its own index
  EXPECT_EQ(merged.getMemory()[1].getEncoding(), wire::ChunkEncoding::WHOLE);
  EXPECT_EQ(merged.getMemory()[1].getData()[0], 0xa);  // with page 1's bytes of checkpoint 4
}

TEST(ServerMerge, FullFirstGivesAFullMergeWithItsSpec) {
  Built a, b;
  fill(a, 1, wire::CheckpointKind::FULL, {1}, 1);
  a.root.initSpec().setVmId("vm");
  fill(b, 2, wire::CheckpointKind::INCREMENTAL, {1}, 2);
  capnp::MallocMessageBuilder out;
  auto merged = out.initRoot<wire::Checkpoint>();
  ASSERT_EQ(mergeCheckpoints({a.root.asReader(), b.root.asReader()}, merged), "");
  EXPECT_EQ(merged.getKind(), wire::CheckpointKind::FULL);
  EXPECT_EQ(std::string(merged.getSpec().getVmId().cStr()), "vm");
  EXPECT_EQ(merged.getBaseSequence(), 0u);
  EXPECT_EQ(merged.getMemory()[0].getData()[0], 2);
}

TEST(ServerMerge, RefusesChunksThatReferToOtherBytes) {
  Built a, b;
  fill(a, 4, wire::CheckpointKind::INCREMENTAL, {1}, 1);
  fill(b, 5, wire::CheckpointKind::INCREMENTAL, {1}, 2);
  b.root.getMemory()[0].setEncoding(wire::ChunkEncoding::XOR_DIFF);
  capnp::MallocMessageBuilder out;
  EXPECT_NE(mergeCheckpoints({a.root.asReader(), b.root.asReader()}, out.initRoot<wire::Checkpoint>()), "");
}

/// Moves the payload of memory chunk `i` of `b` into blob 1 (after `before`
/// bytes of other payloads), as a device's encoder sends it.
void moveToBlob(Built& b, unsigned i, unsigned before) {
  auto chunk = b.root.getMemory()[i];
  std::vector<kj::byte> bytes(before, 0xee);
  for (auto byte : chunk.getData()) bytes.push_back(byte);
  chunk.disownData();
  chunk.setBlob(1);
  chunk.setBlobOffset(before);
  chunk.setBlobSize(static_cast<std::uint32_t>(bytes.size() - before));
  b.root.initBlobs(1).set(0, kj::arrayPtr(bytes.data(), bytes.size()));
}

TEST(ServerMerge, PayloadsInBlobsComeOutInTheirChunks) {
  Built a, b;
  fill(a, 4, wire::CheckpointKind::INCREMENTAL, {1, 2}, 0xa);
  fill(b, 5, wire::CheckpointKind::INCREMENTAL, {2}, 0xb);
  moveToBlob(a, 0, 3);
  moveToBlob(b, 0, 5);
  capnp::MallocMessageBuilder out;
  auto merged = out.initRoot<wire::Checkpoint>();
  ASSERT_EQ(mergeCheckpoints({a.root.asReader(), b.root.asReader()}, merged), "");
  EXPECT_EQ(merged.getBlobs().size(), 0u);
  ASSERT_EQ(merged.getMemory().size(), 2u);
  for (auto chunk : merged.getMemory()) {
    EXPECT_EQ(chunk.getBlob(), 0u);
    EXPECT_EQ(chunk.getBlobSize(), 0u);
    ASSERT_EQ(chunk.getData().size(), 1u);
  }
  EXPECT_EQ(merged.getMemory()[0].getData()[0], 0xa);  // page 1 from 4, out of its blob
  EXPECT_EQ(merged.getMemory()[1].getData()[0], 0xb);  // page 2 from 5, out of its blob
}

// Checkpoints whose payloads came in zstd frames merge into one whose
// payloads are in zstd frames again (a catch-up no larger than lz4 would
// make it), and the merge applies to the source's bytes: the frames of every
// checkpoint stay readable while the chunks are copied out of them.
TEST(ServerMerge, ZstdFramedCheckpointsMergeIntoZstdFrames) {
  testing::TempDir dir;
  constexpr std::uint64_t kUnits = 1500;
  ImageFile source(dir / "src", true, kUnits * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  ImageTracker tracker(source, std::vector<std::uint64_t>(kUnits, zeroUnitHash()), wire::Policy::DIRTY_PREV, true);
  tracker.setCompression({wire::Compression::ZSTD, 3});
  std::mt19937 rng(8);
  std::vector<std::unique_ptr<capnp::MallocMessageBuilder>> messages;
  std::vector<wire::Checkpoint::Reader> run;
  std::vector<ImageDelta> deltas;  // the messages reference their payloads
  deltas.reserve(3);
  for (std::uint64_t sequence = 4; sequence <= 6; ++sequence) {
    std::vector<std::byte> unit(kUnitSize);
    std::vector<std::uint64_t> written;
    for (std::uint64_t i = 0; i < kUnits; ++i) {
      if (rng() % 3 != 0) continue;
      for (std::size_t b = 0; b < kUnitSize; ++b) unit[b] = static_cast<std::byte>((b / 8) % 7 == 0 ? rng() % 4 : sequence);
      source.writeUnit(i, unit);
      written.push_back(i);
    }
    ImageDelta& delta = deltas.emplace_back(tracker.collect(DirtyUnits{.units = written}));
    ASSERT_FALSE(delta.blobFrames.empty());
    auto& message = messages.emplace_back(std::make_unique<capnp::MallocMessageBuilder>());
    auto checkpoint = message->initRoot<wire::Checkpoint>();
    checkpoint.setSequence(sequence);
    checkpoint.setBaseSequence(sequence - 1);
    checkpoint.setKind(wire::CheckpointKind::INCREMENTAL);
    toWire(delta, ImageDelta{}, checkpoint);
    tracker.acknowledge(delta);
    run.push_back(checkpoint.asReader());
  }
  capnp::MallocMessageBuilder out;
  auto merged = out.initRoot<wire::Checkpoint>();
  ASSERT_EQ(mergeCheckpoints(run, merged), "");
  ASSERT_GT(merged.getBlobFrames().size(), 0u);
  EXPECT_EQ(merged.getBlobFrames().size(), merged.getBlobs().size());
  EXPECT_EQ(merged.getBlobFrames()[0].getCompression(), wire::Compression::ZSTD);
  std::uint64_t wire = 0, raw = 0;
  for (unsigned k = 0; k < merged.getBlobs().size(); ++k) {
    wire += merged.getBlobs()[k].size();
    raw += merged.getBlobFrames()[k].getRawSize();
  }
  EXPECT_LT(wire, raw / 2) << "the merge's payloads are compressed again";
  // Units 0.. start as zeros on the receiver; every unit written is in the merge.
  ImageFile ram(dir / "ram", true, kUnits * kUnitSize);
  ImageFile receivedDisk(dir / "rdisk", true, kUnitSize);
  applyCheckpoint(merged.asReader(), ram, receivedDisk);
  EXPECT_EQ(hashAllUnits(ram), hashAllUnits(source));
}

TEST(ServerMerge, RefusesAChunkNamingBytesPastItsBlob) {
  Built a, b;
  fill(a, 4, wire::CheckpointKind::INCREMENTAL, {1}, 1);
  fill(b, 5, wire::CheckpointKind::INCREMENTAL, {1}, 2);
  moveToBlob(b, 0, 0);
  b.root.getMemory()[0].setBlobSize(2);
  capnp::MallocMessageBuilder out;
  EXPECT_EQ(
      mergeCheckpoints({a.root.asReader(), b.root.asReader()}, out.initRoot<wire::Checkpoint>()),
      "checkpoint 5: chunk 1: names bytes 0..2 of blob 1, which has 1");
}

TEST(ServerMerge, RefusesAGapInTheRun) {
  Built a, b;
  fill(a, 4, wire::CheckpointKind::INCREMENTAL, {1}, 1);
  fill(b, 6, wire::CheckpointKind::INCREMENTAL, {1}, 2);
  capnp::MallocMessageBuilder out;
  EXPECT_NE(mergeCheckpoints({a.root.asReader(), b.root.asReader()}, out.initRoot<wire::Checkpoint>()), "");
}

TEST(ServerMerge, RefusesFullFollowedByFinal) {
  Built a, b;
  fill(a, 1, wire::CheckpointKind::FULL, {1}, 1);
  fill(b, 2, wire::CheckpointKind::FINAL, {1}, 2);
  capnp::MallocMessageBuilder out;
  EXPECT_NE(mergeCheckpoints({a.root.asReader(), b.root.asReader()}, out.initRoot<wire::Checkpoint>()), "");
}

}  // namespace
}  // namespace vmsync
