// Compaction: folding a Prev chain into a new base, pruning an Orig chain, and
// what a restart makes of the files a fold or prune leaves behind. Resync:
// the same materialization, compared with a device's unit hashes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <functional>
#include <random>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint_store.h"
#include "checkpoint/chunk_codec.h"
#include "compactor.h"
#include "harvest/unit_hashes.h"
#include "resync.h"
#include "sync_server.h"
#include "base/error.h"
#include "vmm/image_file.h"
#include "test_env.h"
#include "base/units.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;

constexpr std::uint64_t kUnits = 32;

using testing::TempDir;

using Image = std::vector<std::byte>;  // kUnits units

std::span<const std::byte> unitOf(const Image& image, std::uint64_t i) { return {image.data() + i * kUnitSize, kUnitSize}; }

/// Builds checkpoint `sequence` that turns `before` into `after` under
/// `policy` (Diff policies XOR-diff against `reference`), as a device would.
void buildCheckpoint(capnp::MallocMessageBuilder& message, std::uint64_t sequence, wire::Policy policy,
                     const Image& after, const Image& reference, const Image& before) {
  auto c = message.initRoot<wire::Checkpoint>();
  c.setVmId("vm");
  c.setEpoch(1);
  c.setSequence(sequence);
  c.setPolicy(policy);
  c.setOrigin("phone");
  const bool full = sequence == 1;
  const bool orig = isOrigPolicy(policy);
  const bool diff = isDiffPolicy(policy);
  c.setBaseSequence(full ? 0 : sequence - 1);
  c.setKind(full ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
  if (full) {
    auto spec = c.initSpec();
    spec.setVmId("vm");
    spec.setMemoryBytes(kUnits * kUnitSize);
    spec.setDiskBytes(kUnits * kUnitSize);
    spec.setPolicy(policy);
  }
  std::vector<EncodedUnit> units;
  for (std::uint64_t i = 0; i < kUnits; ++i) {
    // Orig lists every unit that differs from the base; Prev what changed.
    const Image& against = orig ? reference : before;
    if (!full && std::memcmp(unitOf(after, i).data(), unitOf(against, i).data(), kUnitSize) == 0) continue;
    units.push_back(diff && !full ? encodeDiff(i, unitOf(after, i), unitOf(reference, i), true)
                                  : encodeWhole(i, unitOf(after, i), true));
  }
  auto memory = c.initMemory(static_cast<unsigned>(units.size()));
  auto disk = c.initDisk(static_cast<unsigned>(units.size()));
  for (unsigned i = 0; i < units.size(); ++i) {
    toWire(units[i], memory[i]);
    toWire(units[i], disk[i]);
  }
}

/// Rewrites a few bytes of a few units, the way a guest dirties pages.
void mutate(Image& image, std::mt19937& rng) {
  for (int n = 0; n < 3; ++n) {
    std::uint64_t unit = rng() % kUnits;
    for (int b = 0; b < 40; ++b) image[unit * kUnitSize + rng() % kUnitSize] = std::byte(rng() & 0xff);
  }
  std::uint64_t zeroed = rng() % kUnits;
  std::fill_n(image.begin() + static_cast<long>(zeroed * kUnitSize), kUnitSize, std::byte{0});
}

/// Builds checkpoints 1..count of a random walk of the image, handing each
/// to `sink` (with its sequence); returns the image after the last one.
Image walkChain(wire::Policy policy, int count, unsigned seed,
                const std::function<void(int, wire::Checkpoint::Builder)>& sink) {
  std::mt19937 rng(seed);
  Image zero(kUnits * kUnitSize), base, prev = zero, current(kUnits * kUnitSize);
  for (auto& b : current) b = std::byte(rng() & 0xff);
  for (int s = 1; s <= count; ++s) {
    if (s > 1) mutate(current, rng);
    capnp::MallocMessageBuilder message;
    buildCheckpoint(message, static_cast<std::uint64_t>(s), policy, current,
                    s == 1 ? zero : (isOrigPolicy(policy) ? base : prev), prev);
    sink(s, message.getRoot<wire::Checkpoint>());
    if (s == 1) base = current;
    prev = current;
  }
  return current;
}

/// Appends checkpoints 1..count of a random walk to `store`.
Image writeChain(CheckpointStore& store, wire::Policy policy, int count, unsigned seed) {
  return walkChain(policy, count, seed, [&](int, wire::Checkpoint::Builder c) { store.append(c.asReader()); });
}

/// Applies `checkpoint` to fresh images (or `ram`/`disk`) and returns RAM.
Image contents(const ImageFile& image) { return Image(image.bytes().begin(), image.bytes().end()); }

TEST(Compaction, FoldMaterializesTheSameImageAStandbyHas) {
  for (wire::Policy policy : {wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV}) {
    TempDir dir;
    CheckpointStore store(dir.path());
    Image expected = writeChain(store, policy, 12, 7);
    std::vector<std::string> paths;
    for (std::uint64_t s = 1; s <= 12; ++s) paths.push_back(store.pathOf(s));
    std::atomic<bool> cancel{false};
    FoldStats stats = foldChain(paths, store.scratchDir(), store.foldPath(12), cancel);
    EXPECT_EQ(stats.sequence, 12u);
    EXPECT_EQ(stats.folded, 12u);
    EXPECT_FALSE(fs::exists(store.scratchDir())) << "the scratch images are removed";
    store.commitFold(12);
    EXPECT_EQ(store.base(), 12u);
    EXPECT_EQ(store.head(), 12u);
    EXPECT_FALSE(store.stored(11));
    EXPECT_THROW(store.read(5), Error);

    // A device that applies the new base alone has the image of checkpoint 12.
    auto folded = store.read(12);
    EXPECT_EQ(folded->reader().getKind(), wire::CheckpointKind::FULL);
    EXPECT_EQ(folded->reader().getBaseSequence(), 0u);
    ImageFile ram(dir.path() + "/ram.img", true, kUnits * kUnitSize);
    ImageFile disk(dir.path() + "/disk.img", true, kUnits * kUnitSize);
    applyCheckpoint(folded->reader(), ram, disk);
    EXPECT_TRUE(contents(ram) == expected) << "policy " << static_cast<int>(policy);
    EXPECT_TRUE(contents(disk) == expected);
  }
}

TEST(Compaction, ChainAfterAFoldSurvivesRestartAndLeftoversAreRemoved) {
  TempDir dir;
  {
    CheckpointStore store(dir.path());
    writeChain(store, wire::Policy::DIRTY_PREV, 6, 3);
    std::vector<std::string> paths;
    for (std::uint64_t s = 1; s <= 4; ++s) paths.push_back(store.pathOf(s));
    std::atomic<bool> cancel{false};
    foldChain(paths, store.scratchDir(), store.foldPath(4), cancel);
    // Stopped here: the new base is committed, but what it replaces is still
    // there, as after a crash before commitFold().
    fs::create_directories(store.scratchDir());
  }
  CheckpointStore store(dir.path());
  EXPECT_EQ(store.base(), 4u);
  EXPECT_EQ(store.first(), 5u);
  EXPECT_EQ(store.head(), 6u);
  EXPECT_FALSE(fs::exists(dir.path() + "/checkpoints/00000000000000000001.ckpt"));
  EXPECT_FALSE(fs::exists(dir.path() + "/checkpoints/00000000000000000004.ckpt"));
  EXPECT_FALSE(fs::exists(store.scratchDir()));
  EXPECT_EQ(store.read(4)->reader().getKind(), wire::CheckpointKind::FULL);
  EXPECT_EQ(store.read(6)->reader().getSequence(), 6u);
}

TEST(Compaction, FoldRefusesAChainThatDoesNotFollowOn) {
  TempDir dir;
  CheckpointStore store(dir.path());
  writeChain(store, wire::Policy::DIRTY_PREV, 5, 5);
  std::atomic<bool> cancel{false};
  std::vector<std::string> gap = {store.pathOf(1), store.pathOf(2), store.pathOf(4)};
  try {
    foldChain(gap, store.scratchDir(), store.foldPath(4), cancel);
    FAIL() << "a chain with a gap was folded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not follow checkpoint 2"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(store.foldPath(4)));
  cancel = true;
  std::vector<std::string> all = {store.pathOf(1), store.pathOf(2), store.pathOf(3)};
  EXPECT_THROW(foldChain(all, store.scratchDir(), store.foldPath(3), cancel), Error);
  EXPECT_FALSE(fs::exists(store.foldPath(3)));
}

TEST(Compaction, PruneKeepsTheBaseAndTheNewestOrigCheckpoint) {
  TempDir dir;
  Image expected;
  {
    CheckpointStore store(dir.path());
    expected = writeChain(store, wire::Policy::DIFF_ORIG, 9, 11);
    store.prune(9);
    EXPECT_EQ(store.base(), 1u);
    EXPECT_EQ(store.first(), 9u);
    EXPECT_FALSE(store.stored(5));
  }
  // A restart accepts the gap: checkpoint 9 needs only the base.
  CheckpointStore store(dir.path());
  EXPECT_EQ(store.base(), 1u);
  EXPECT_EQ(store.first(), 9u);
  EXPECT_EQ(store.head(), 9u);
  ImageFile ram(dir.path() + "/ram.img", true, kUnits * kUnitSize);
  ImageFile disk(dir.path() + "/disk.img", true, kUnits * kUnitSize);
  applyCheckpoint(store.read(1)->reader(), ram, disk);
  fs::copy_file(dir.path() + "/ram.img", dir.path() + "/base-ram.img");
  fs::copy_file(dir.path() + "/disk.img", dir.path() + "/base-disk.img");
  ImageFile baseRam(dir.path() + "/base-ram.img", false), baseDisk(dir.path() + "/base-disk.img", false);
  applyCheckpoint(store.read(9)->reader(), ram, disk, BaseImage{&baseRam, &baseDisk});
  EXPECT_TRUE(contents(ram) == expected);
}

TEST(Compaction, AMissingPrevCheckpointIsDamageNotAGap) {
  TempDir dir;
  {
    CheckpointStore store(dir.path());
    writeChain(store, wire::Policy::DIRTY_PREV, 5, 13);
  }
  fs::remove(dir.path() + "/checkpoints/00000000000000000003.ckpt");
  try {
    CheckpointStore store(dir.path());
    FAIL() << "a chain missing a Prev checkpoint was opened";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoints 3 to 3 are missing"), std::string::npos) << e.what();
  }
}

/// Pushes checkpoints 1..count of a random walk through a real SyncServer as
/// device "phone"; returns the image after the last.
Image pushChain(SyncServer& server, kj::WaitScope& scope, wire::Policy policy, int count, unsigned seed) {
  server.registerDevice("phone", capnp::Capability::Client(nullptr).castAs<wire::DevicePeer>(), 0);
  const std::uint64_t epoch = server.acquireLease("phone");
  Image last = walkChain(policy, count, seed, [&](int s, wire::Checkpoint::Builder c) {
    c.setEpoch(epoch);
    if (s == 1) c.getSpec().setVmId("vm");
    server.push("phone", c.asReader());
    // Let a fold finish now and then, as the event loop would between pushes.
    while (s % 4 == 0 && server.compacting()) scope.poll();
  });
  while (server.compacting()) scope.poll();
  return last;
}

TEST(Compaction, ServerFoldsOnItsWorkerThreadAndReopensAtTheNewBase) {
  TempDir dir;
  kj::EventLoop loop;
  kj::WaitScope scope(loop);
  Image expected;
  {
    SyncServer server(dir.path(), CompactionLimits{5, 0});
    expected = pushChain(server, scope, wire::Policy::DIFF_PREV, 23, 17);
    EXPECT_EQ(server.head(), 23u);
  }
  CheckpointStore store(dir.path());
  EXPECT_EQ(store.head(), 23u);
  EXPECT_GE(store.base(), 15u) << "the chain was not folded";
  EXPECT_LT(store.head() - store.base(), 10u);
  // The base plus what follows it rebuilds the head's image.
  ImageFile ram(dir.path() + "/ram.img", true, kUnits * kUnitSize);
  ImageFile disk(dir.path() + "/disk.img", true, kUnits * kUnitSize);
  applyCheckpoint(store.read(store.base())->reader(), ram, disk);
  for (std::uint64_t s = store.first(); s <= store.head(); ++s) applyCheckpoint(store.read(s)->reader(), ram, disk);
  EXPECT_TRUE(contents(ram) == expected);
}

TEST(Compaction, AFoldWaitsWhileTheServersFoldSlotsAreTakenAndRunsOnceOneIsFree) {
  TempDir dir;
  kj::EventLoop loop;
  kj::WaitScope scope(loop);
  auto slots = std::make_shared<ServerBudget>(1);
  ASSERT_TRUE(slots->tryTake(1));  // another VM folds
  {
    SyncServer server(dir.path(), CompactionLimits{5, 0});
    server.setFoldSlots(slots);
    pushChain(server, scope, wire::Policy::DIFF_PREV, 12, 23);
    EXPECT_FALSE(server.compacting());
    EXPECT_EQ(CheckpointStore(dir.path()).base(), 1u) << "a fold ran while the server's only fold slot was taken";
    slots->give(1);
    // The same walk, one step further: checkpoint 13 follows the chain.
    walkChain(wire::Policy::DIFF_PREV, 13, 23, [&](int s, wire::Checkpoint::Builder c) {
      if (s < 13) return;
      c.setEpoch(1);  // the lease pushChain took
      server.push("phone", c.asReader());
    });
    EXPECT_TRUE(server.compacting()) << "the fold did not start once the slot was free";
    EXPECT_EQ(slots->used(), 1u);
    while (server.compacting()) scope.poll();
    EXPECT_EQ(slots->used(), 0u) << "the fold kept its slot";
  }
  EXPECT_GE(CheckpointStore(dir.path()).base(), 12u);
}

TEST(Compaction, ServerPrunesAnOrigChainAtOnce) {
  TempDir dir;
  kj::EventLoop loop;
  kj::WaitScope scope(loop);
  {
    SyncServer server(dir.path(), CompactionLimits{4, 0});
    pushChain(server, scope, wire::Policy::DIRTY_ORIG, 14, 19);
  }
  CheckpointStore store(dir.path());
  EXPECT_EQ(store.base(), 1u);
  EXPECT_EQ(store.head(), 14u);
  EXPECT_LT(store.head() - store.first(), 4u) << "old Orig checkpoints were kept";
}

std::vector<std::uint64_t> hashesOf(const Image& image) {
  std::vector<std::uint64_t> hashes(kUnits);
  for (std::uint64_t i = 0; i < kUnits; ++i) hashes[i] = hashUnit(unitOf(image, i));
  return hashes;
}

std::vector<std::string> chainPaths(const CheckpointStore& store, wire::Policy policy) {
  std::vector<std::string> paths{store.pathOf(store.base())};
  if (isOrigPolicy(policy)) {
    paths.push_back(store.pathOf(store.head()));
  } else {
    for (std::uint64_t s = store.first(); s <= store.head(); ++s) paths.push_back(store.pathOf(s));
  }
  return paths;
}

TEST(Resync, TakesAnImagePastTheChainToItWithOnlyTheUnitsThatDiffer) {
  for (wire::Policy policy : {wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV, wire::Policy::DIFF_ORIG}) {
    TempDir dir;
    CheckpointStore store(dir.path());
    const Image expected = writeChain(store, policy, 9, 21);
    // The device applied the same walk up to 6, then its VM went on alone.
    Image device = walkChain(policy, 6, 21, [](int, wire::Checkpoint::Builder) {});
    std::mt19937 rng(99);
    for (int i = 0; i < 4; ++i) mutate(device, rng);
    std::uint64_t differ = 0;
    for (std::uint64_t i = 0; i < kUnits; ++i)
      differ += std::memcmp(unitOf(device, i).data(), unitOf(expected, i).data(), kUnitSize) != 0;
    ASSERT_GT(differ, 0u);
    ASSERT_LT(differ, kUnits) << "the test needs units that already match";

    capnp::MallocMessageBuilder message;
    std::atomic<bool> cancel{false};
    ResyncStats stats = buildResync(chainPaths(store, policy), dir.path() + "/scratch", 6, hashesOf(device),
                                    hashesOf(device), message, cancel);
    EXPECT_FALSE(fs::exists(dir.path() + "/scratch")) << "the scratch images are removed";
    auto resync = message.getRoot<wire::Checkpoint>().asReader();
    EXPECT_EQ(stats.sequence, 9u);
    EXPECT_FALSE(stats.final);
    EXPECT_TRUE(resync.getResync());
    EXPECT_EQ(resync.getBaseSequence(), 6u);
    EXPECT_EQ(resync.getSequence(), 9u);
    EXPECT_EQ(resync.getPolicy(), wire::Policy::DIRTY_PREV) << "left-out units keep the device's value";
    EXPECT_EQ(stats.memoryUnits, differ) << "policy " << static_cast<int>(policy);
    EXPECT_EQ(resync.getMemory().size(), differ);
    EXPECT_EQ(resync.getDisk().size(), differ);

    ImageFile ram(dir.path() + "/ram.img", true, kUnits * kUnitSize);
    ImageFile disk(dir.path() + "/disk.img", true, kUnits * kUnitSize);
    for (std::uint64_t i = 0; i < kUnits; ++i) {
      ram.writeUnit(i, unitOf(device, i));
      disk.writeUnit(i, unitOf(device, i));
    }
    applyCheckpoint(resync, ram, disk);
    EXPECT_TRUE(contents(ram) == expected) << "policy " << static_cast<int>(policy);
    EXPECT_TRUE(contents(disk) == expected);
  }
}

TEST(Resync, ToAFinalCheckpointCarriesItsStateAndChecksItsDigest) {
  const Image atFive = walkChain(wire::Policy::DIRTY_PREV, 5, 4, [](int, wire::Checkpoint::Builder) {});
  const std::vector<std::uint64_t> hashes = hashesOf(atFive);
  const Digest digest = imageDigest(hashes, hashes);
  for (bool rightDigest : {true, false}) {
    TempDir dir;
    CheckpointStore store(dir.path());
    walkChain(wire::Policy::DIRTY_PREV, 5, 4, [&](int s, wire::Checkpoint::Builder c) {
      if (s == 5) {
        c.setKind(wire::CheckpointKind::FINAL);
        c.setDeviceState(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>("cpu"), 3));
        Digest d = digest;
        if (!rightDigest) d[0] ^= std::byte{1};
        c.setImageDigest(capnp::Data::Reader(reinterpret_cast<const capnp::byte*>(d.data()), d.size()));
      }
      store.append(c.asReader());
    });
    const Image device(kUnits * kUnitSize);  // nothing applied yet: all zero
    capnp::MallocMessageBuilder message;
    std::atomic<bool> cancel{false};
    if (!rightDigest) {
      try {
        buildResync(chainPaths(store, wire::Policy::DIRTY_PREV), dir.path() + "/scratch", 3, hashesOf(device),
                    hashesOf(device), message, cancel);
        FAIL() << "a chain that does not match its digest was sent";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("does not match its digest"), std::string::npos) << e.what();
      }
      continue;
    }
    ResyncStats stats = buildResync(chainPaths(store, wire::Policy::DIRTY_PREV), dir.path() + "/scratch", 3,
                                    hashesOf(device), hashesOf(device), message, cancel);
    auto resync = message.getRoot<wire::Checkpoint>().asReader();
    EXPECT_TRUE(stats.final);
    EXPECT_EQ(resync.getKind(), wire::CheckpointKind::FINAL);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(resync.getDeviceState().begin()), 3), "cpu");
    EXPECT_EQ(resync.getImageDigest().size(), digest.size());
    EXPECT_EQ(std::memcmp(resync.getImageDigest().begin(), digest.data(), digest.size()), 0);
  }
}

TEST(Resync, RefusesHashesOfAnImageOfAnotherSize) {
  TempDir dir;
  CheckpointStore store(dir.path());
  writeChain(store, wire::Policy::DIRTY_PREV, 3, 8);
  capnp::MallocMessageBuilder message;
  std::atomic<bool> cancel{false};
  const std::vector<std::uint64_t> tooFew(kUnits - 1, zeroUnitHash());
  try {
    buildResync(chainPaths(store, wire::Policy::DIRTY_PREV), dir.path() + "/scratch", 2, tooFew, tooFew, message,
                cancel);
    FAIL() << "hashes of a smaller image were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the device's image has 31 pages"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace vmsync
