// Every policy, simulated on a changing image: the receiver must end equal to
// the source after every checkpoint, and Orig receivers from the latest alone.
#include <capnp/message.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "base/error.h"
#include "harvest/unit_hashes.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t kUnits = 96;

struct Dir {
  std::string path;
  Dir() {
    char tmpl[] = "/tmp/vmsync-policy-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~Dir() { fs::remove_all(path); }
  std::string operator/(const char* name) const { return path + "/" + name; }
};

/// Builds a checkpoint message holding `memory` as its RAM list.
void fill(capnp::MallocMessageBuilder& message, const ImageDelta& memory, wire::Policy policy, bool full,
          std::uint64_t sequence) {
  auto c = message.initRoot<wire::Checkpoint>();
  c.setPolicy(policy);
  c.setKind(full ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
  c.setSequence(sequence);
  toWire(memory, ImageDelta{}, c);
}

/// Mutates the source: rewrites a few bytes of some units, zeroes one, copies one onto another.
void mutate(ImageFile& source, std::mt19937& rng) {
  std::vector<std::byte> unit(kUnitSize);
  for (int k = 0; k < 6; ++k) {
    std::uint64_t index = rng() % kUnits;
    auto live = source.unit(index);
    std::copy(live.begin(), live.end(), unit.begin());
    for (int b = 0; b < 40; ++b) unit[rng() % kUnitSize] = static_cast<std::byte>(rng());
    source.writeUnit(index, unit);
  }
  std::fill(unit.begin(), unit.end(), std::byte{0});
  source.writeUnit(rng() % kUnits, unit);
  auto from = source.unit(rng() % kUnits);
  std::copy(from.begin(), from.end(), unit.begin());
  source.writeUnit(rng() % kUnits, unit);
}

class EveryPolicy : public ::testing::TestWithParam<std::tuple<wire::Policy, bool>> {};

TEST_P(EveryPolicy, ReceiverEqualsSourceAfterEveryCheckpoint) {
  const auto [policy, compress] = GetParam();
  Dir dir;
  ImageFile source(dir / "source", true, kUnits * kUnitSize);
  ImageFile receiver(dir / "receiver", true, kUnits * kUnitSize);
  ImageFile late(dir / "late", true, kUnits * kUnitSize);  // only the full and the latest (Orig)
  ImageFile disk(dir / "disk", true, kUnitSize);
  std::mt19937 rng(42);
  std::vector<std::byte> unit(kUnitSize);
  for (std::uint64_t i = 0; i < kUnits; i += 3) {
    for (auto& b : unit) b = static_cast<std::byte>(rng() % 4);  // compressible, non-zero
    source.writeUnit(i, unit);
  }
  ImageTracker tracker(source, std::vector<std::uint64_t>(kUnits, zeroUnitHash()), policy, compress);
  std::unique_ptr<ImageFile> base, lateBase;
  std::unique_ptr<capnp::MallocMessageBuilder> latest;
  ImageDelta latestDelta;  // the payloads `latest` references
  std::uint64_t diffBytes = 0, dirtyBytes = 0;

  for (std::uint64_t round = 1; round <= 8; ++round) {
    if (round > 1) mutate(source, rng);
    ImageDelta delta = tracker.collect(DirtyUnits{.everything = true});
    auto message = std::make_unique<capnp::MallocMessageBuilder>();
    fill(*message, delta, policy, round == 1, round);
    auto reader = message->getRoot<wire::Checkpoint>().asReader();
    applyCheckpoint(reader, receiver, disk, BaseImage{base.get(), base ? &disk : nullptr});
    tracker.acknowledge(delta);
    if (round > 1) {
      diffBytes += delta.encodedBytes;
      dirtyBytes += delta.rawBytes;
    }
    if (round == 1) {
      applyCheckpoint(reader, late, disk);
      if (isOrigPolicy(policy)) {
        fs::copy_file(receiver.path(), dir / "base");
        base = std::make_unique<ImageFile>(dir / "base", false);
        tracker.setBase(*base);
      }
    }
    latest = std::move(message);
    latestDelta = std::move(delta);
    ASSERT_EQ(hashAllUnits(receiver), hashAllUnits(source)) << "round " << round;
    ASSERT_EQ(tracker.receiverHashes(), hashAllUnits(source)) << "round " << round;
  }
  if (isOrigPolicy(policy)) {
    applyCheckpoint(latest->getRoot<wire::Checkpoint>().asReader(), late, disk, BaseImage{base.get(), &disk});
    EXPECT_EQ(hashAllUnits(late), hashAllUnits(source)) << "catch-up from the latest Orig checkpoint alone";
  }
  if (isDiffPolicy(policy) && !compress) {
    EXPECT_LT(diffBytes, dirtyBytes / 4) << "Diff should ship far less";
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, EveryPolicy,
                         ::testing::Combine(::testing::Values(wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV,
                                                              wire::Policy::DIRTY_ORIG, wire::Policy::DIFF_ORIG),
                                            ::testing::Bool()));

/// The bytes of every unit of `image`.
std::vector<std::vector<std::byte>> unitsOf(const ImageFile& image) {
  std::vector<std::vector<std::byte>> units;
  for (std::uint64_t i = 0; i < image.units(); ++i)
    units.emplace_back(image.unit(i).begin(), image.unit(i).end());
  return units;
}

// A standby's journal replays a checkpoint after a crash that may have come
// before, during or after its image writes. So applying a checkpoint again
// over an image that holds some of its units already must leave the same
// image: an XOR-diff carries the changed bytes themselves (not their XOR), so
// decoding it against the unit it left gives that unit again.
class Replay : public ::testing::TestWithParam<wire::Policy> {};

TEST_P(Replay, ApplyingACheckpointAgainAfterSomeOfItsWritesLeavesTheSameImage) {
  const wire::Policy policy = GetParam();
  Dir dir;
  ImageFile source(dir / "source", true, kUnits * kUnitSize);
  ImageFile receiver(dir / "receiver", true, kUnits * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  std::mt19937 rng(7);
  std::vector<std::byte> unit(kUnitSize);
  for (std::uint64_t i = 0; i < kUnits; ++i) {
    for (auto& b : unit) b = static_cast<std::byte>(rng() % 4 + 1);
    source.writeUnit(i, unit);
  }
  ImageTracker tracker(source, std::vector<std::uint64_t>(kUnits, zeroUnitHash()), policy, false);
  ImageDelta first = tracker.collect(DirtyUnits{.everything = true});
  capnp::MallocMessageBuilder full;
  fill(full, first, policy, true, 1);
  applyCheckpoint(full.getRoot<wire::Checkpoint>().asReader(), receiver, disk);
  tracker.acknowledge(first);
  std::unique_ptr<ImageFile> base;
  if (isOrigPolicy(policy)) {
    fs::copy_file(receiver.path(), dir / "base");
    base = std::make_unique<ImageFile>(dir / "base", false);
    tracker.setBase(*base);
  }
  const BaseImage bases{base.get(), base ? &disk : nullptr};

  mutate(source, rng);
  ImageDelta delta = tracker.collect(DirtyUnits{.everything = true});
  capnp::MallocMessageBuilder message;
  fill(message, delta, policy, false, 2);
  const auto checkpoint = message.getRoot<wire::Checkpoint>().asReader();
  if (isDiffPolicy(policy)) {
    bool xorDiff = false;
    for (const auto chunk : checkpoint.getMemory())
      xorDiff = xorDiff || chunk.getEncoding() == wire::ChunkEncoding::XOR_DIFF;
    ASSERT_TRUE(xorDiff) << "the checkpoint has no XOR-diff to replay";
  }
  const auto before = unitsOf(receiver);
  const auto after = unitsOf(source);
  applyCheckpoint(checkpoint, receiver, disk, bases);
  ASSERT_EQ(unitsOf(receiver), after);
  // Replayed after every write.
  applyCheckpoint(checkpoint, receiver, disk, bases);
  EXPECT_EQ(unitsOf(receiver), after);
  // Replayed after some of them: odd units written, even ones not.
  for (std::uint64_t i = 0; i < kUnits; i += 2) receiver.writeUnit(i, before[i]);
  applyCheckpoint(checkpoint, receiver, disk, bases);
  EXPECT_EQ(unitsOf(receiver), after);
}

INSTANTIATE_TEST_SUITE_P(Policies, Replay,
                         ::testing::Values(wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV,
                                           wire::Policy::DIRTY_ORIG, wire::Policy::DIFF_ORIG));

TEST(XorDiff, RoundTripsRandomSparseZeroAndIdenticalUnits) {
  std::mt19937 rng(7);
  std::vector<std::byte> ref(kUnitSize), cur(kUnitSize), out(kUnitSize), enc;
  for (auto& b : ref) b = static_cast<std::byte>(rng());
  // Identical: empty diff.
  ASSERT_TRUE(encodeXorDiff(ref, ref, kUnitSize, enc));
  EXPECT_TRUE(enc.empty());
  decodeXorDiff(enc, ref, out);
  EXPECT_EQ(out, ref);
  // Sparse changes, including the first and the last byte.
  cur = ref;
  for (std::size_t i : {std::size_t{0}, std::size_t{17}, std::size_t{18}, std::size_t{2000}, kUnitSize - 1})
    cur[i] = ~cur[i];
  ASSERT_TRUE(encodeXorDiff(cur, ref, kUnitSize, enc));
  EXPECT_LT(enc.size(), 40u);
  EXPECT_EQ(changedBytes(cur, ref), 5u);
  decodeXorDiff(enc, ref, out);
  EXPECT_EQ(out, cur);
  // All zero against random, and random against zero.
  std::vector<std::byte> zero(kUnitSize);
  ASSERT_TRUE(encodeXorDiff(zero, ref, 2 * kUnitSize, enc));
  decodeXorDiff(enc, ref, out);
  EXPECT_EQ(out, zero);
  for (auto& b : cur) b = static_cast<std::byte>(rng() | 1);
  ASSERT_TRUE(encodeXorDiff(cur, zero, 2 * kUnitSize, enc));
  decodeXorDiff(enc, zero, out);
  EXPECT_EQ(out, cur);
  // A limit below the needed size is reported.
  EXPECT_FALSE(encodeXorDiff(cur, zero, kUnitSize - 1, enc));
}

TEST(XorDiff, RejectsMalformedInput) {
  std::vector<std::byte> ref(kUnitSize), out(kUnitSize);
  auto bytes = [](std::initializer_list<int> v) {
    std::vector<std::byte> b;
    for (int x : v) b.push_back(static_cast<std::byte>(x));
    return b;
  };
  EXPECT_THROW(decodeXorDiff(bytes({0x80}), ref, out), Error);                    // truncated varint
  EXPECT_THROW(decodeXorDiff(bytes({0x00, 0x05, 1, 2}), ref, out), Error);        // run longer than data
  EXPECT_THROW(decodeXorDiff(bytes({0xFF, 0x3F, 0x01, 0x09}), ref, out), Error);  // skip past the end
  EXPECT_THROW(decodeXorDiff(bytes({0x00, 0x00}), ref, out), Error);              // empty changed run
  EXPECT_THROW(decodeXorDiff(bytes({0xFF, 0xFF, 0xFF, 0xFF}), ref, out), Error);  // varint too long
}

TEST(SameAs, IdenticalUnitsShipOnceAndForwardReferencesAreRejected) {
  Dir dir;
  ImageFile source(dir / "source", true, 8 * kUnitSize);
  ImageFile receiver(dir / "receiver", true, 8 * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  std::vector<std::byte> unit(kUnitSize);
  std::mt19937 rng(3);
  for (auto& b : unit) b = static_cast<std::byte>(rng());
  for (std::uint64_t i : {1, 4, 6}) source.writeUnit(i, unit);
  ImageTracker tracker(source, std::vector<std::uint64_t>(8, zeroUnitHash()), wire::Policy::DIRTY_PREV, true);
  ImageDelta delta = tracker.collect(DirtyUnits{.everything = true});
  ASSERT_EQ(delta.units.size(), 3u);
  EXPECT_EQ(delta.units[1].encoding, wire::ChunkEncoding::SAME_AS);
  EXPECT_EQ(delta.units[2].encoding, wire::ChunkEncoding::SAME_AS);
  EXPECT_EQ(delta.encodedBytes, kUnitSize);
  capnp::MallocMessageBuilder message;
  fill(message, delta, wire::Policy::DIRTY_PREV, true, 1);
  applyCheckpoint(message.getRoot<wire::Checkpoint>().asReader(), receiver, disk);
  EXPECT_EQ(hashAllUnits(receiver), hashAllUnits(source));
  // A reference to a later chunk is malformed.
  message.getRoot<wire::Checkpoint>().getMemory()[1].setSameAs(2);
  EXPECT_THROW(applyCheckpoint(message.getRoot<wire::Checkpoint>().asReader(), receiver, disk), Error);
}

}  // namespace
}  // namespace vmsync
