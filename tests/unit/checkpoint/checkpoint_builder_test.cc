#include "checkpoint/checkpoint_builder.h"

#include <capnp/message.h>
#include <capnp/schema.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "checkpoint/checkpoint_applier.h"
#include "base/error.h"
#include "test_env.h"
#include "harvest/unit_hashes.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vmsync-test-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void writeUnit(const std::string& path, std::uint64_t index, char fill) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(index * kUnitSize));
  std::string data(kUnitSize, fill);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
}

/// Ships `delta` for both images into a checkpoint and applies it to `ram`/`disk`.
void shipTo(const ImageDelta& memory, ImageFile& ram, ImageFile& disk) {
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  toWire(memory, ImageDelta{}, checkpoint);
  applyCheckpoint(checkpoint.asReader(), ram, disk);
}

TEST(ImageTracker, ScanFindsExactlyTheChangedUnitsAndTheReceiverConverges) {
  TempDir dir;
  ImageFile source(dir.file("source"), true, 64 * kUnitSize);
  ImageFile receiverRam(dir.file("receiver"), true, 64 * kUnitSize);
  ImageFile receiverDisk(dir.file("disk"), true, 4 * kUnitSize);
  ImageTracker tracker(source, std::vector<std::uint64_t>(64, zeroUnitHash()), wire::Policy::DIRTY_PREV, true);

  writeUnit(source.path(), 3, 'a');
  writeUnit(source.path(), 40, 'b');
  ImageDelta first = tracker.collect(DirtyUnits{.everything = true});
  ASSERT_EQ(first.units.size(), 2u);
  EXPECT_EQ(first.units[0].index, 3u);
  EXPECT_EQ(first.units[1].index, 40u);
  tracker.acknowledge(first);
  shipTo(first, receiverRam, receiverDisk);

  writeUnit(source.path(), 40, 'c');
  writeUnit(source.path(), 41, 'd');
  ImageDelta second = tracker.collect(DirtyUnits{.everything = true});
  ASSERT_EQ(second.units.size(), 2u);
  tracker.acknowledge(second);
  shipTo(second, receiverRam, receiverDisk);

  EXPECT_EQ(hashAllUnits(source), hashAllUnits(receiverRam));
  EXPECT_EQ(tracker.receiverHashes(), hashAllUnits(receiverRam));
}

// A scan compares the units in holes of the image file by the zero hash and
// does not read them. It finds a unit written into a hole, and a unit the
// receiver holds non-zero where the file now has a hole (a VMM that discards
// guest RAM punches one).
TEST(ImageTracker, AScanFindsChangesInAndAroundHolesWithoutReadingThem) {
  TempDir dir;
  constexpr std::uint64_t kUnits = 2048;
  ImageFile source(dir.file("source"), true, kUnits * kUnitSize);
  writeUnit(source.path(), 10, 'a');
  writeUnit(source.path(), 1000, 'b');
  std::vector<std::uint64_t> receiver = hashAllUnits(source);
  const std::vector<std::byte> nonZero(kUnitSize, std::byte{'z'});
  receiver[1500] = hashUnit(nonZero);
  ImageTracker tracker(source, receiver, wire::Policy::DIRTY_PREV, true);
  writeUnit(source.path(), 700, 'c');
  source.recache();  // out to the file; what may hold data read back, holes left out
  ImageDelta delta = tracker.collect(DirtyUnits{.everything = true});
  ASSERT_EQ(delta.units.size(), 2u);
  EXPECT_EQ(delta.units[0].index, 700u);
  EXPECT_EQ(delta.units[1].index, 1500u);
  EXPECT_EQ(delta.units[1].encoding, wire::ChunkEncoding::ZERO);
  tracker.acknowledge(delta);
  EXPECT_EQ(tracker.receiverHashes(), hashAllUnits(source));

  const auto runs = source.dataRuns();
  if (std::any_of(runs.begin(), runs.end(),
                  [](const UnitRun& r) { return r.first <= 300 && 300 < r.end; }))
    VMSYNC_SKIP_OR_FAIL("the file system under the test's directory reports no holes");
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::byte* unit300 = source.bytes().data() + 300 * kUnitSize / page * page;
  unsigned char resident = 1;
  ASSERT_EQ(::mincore(const_cast<std::byte*>(unit300), page, &resident), 0) << std::strerror(errno);
  EXPECT_EQ(resident & 1, 0) << "the scan read unit 300, which is in a hole";
}

TEST(ImageTracker, FailedPushShipsTheUnitsAgainEvenIfTheSourceForgetsThem) {
  TempDir dir;
  ImageFile source(dir.file("source"), true, 16 * kUnitSize);
  ImageTracker tracker(source, std::vector<std::uint64_t>(16, zeroUnitHash()), wire::Policy::DIRTY_PREV, false);
  writeUnit(source.path(), 5, 'x');
  // A tracking source (kmod, bpf) reports unit 5 once and resets.
  ImageDelta lost = tracker.collect(DirtyUnits{.units = {5}});
  ASSERT_EQ(lost.units.size(), 1u);
  tracker.retryLater(lost);
  // The next harvest reports nothing new, but unit 5 must still ship.
  ImageDelta again = tracker.collect(DirtyUnits{});
  ASSERT_EQ(again.units.size(), 1u);
  EXPECT_EQ(again.units[0].index, 5u);
  tracker.acknowledge(again);
  EXPECT_TRUE(tracker.collect(DirtyUnits{}).units.empty());
}

// A dirty-page list names units that were written, not units that changed:
// a list and a scan of the same image build the same checkpoint, whatever the
// list holds twice or holds rewritten with the same bytes.
TEST(ImageTracker, ADirtyListBuildsWhatAScanBuilds) {
  TempDir dir;
  ImageFile source(dir.file("source"), true, 64 * kUnitSize);
  for (auto policy : {wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV}) {
    SCOPED_TRACE(static_cast<int>(policy));
    auto reference = [&] { return std::vector<std::byte>(source.bytes().begin(), source.bytes().end()); };
    ImageTracker byList(source, hashAllUnits(source), policy, true, reference());
    ImageTracker byScan(source, hashAllUnits(source), policy, true, reference());
    for (std::uint32_t round = 1; round <= 3; ++round) {
      std::vector<std::byte> same(source.unit(7).begin(), source.unit(7).end());
      source.writeUnit(7, same);                       // written, unchanged
      const char fill = static_cast<char>('a' + round + 4 * static_cast<int>(policy));
      writeUnit(source.path(), 10 + round, fill);      // changed
      writeUnit(source.path(), 30, fill + 16);         // changed every round
      ImageDelta list = byList.collect(DirtyUnits{.units = {30, 7, 10 + round, 30}});
      ImageDelta scan = byScan.collect(DirtyUnits{.everything = true});
      ASSERT_EQ(list.units.size(), 2u) << "round " << round;
      ASSERT_EQ(list.units.size(), scan.units.size());
      for (std::size_t i = 0; i < list.units.size(); ++i) {
        EXPECT_EQ(list.units[i].index, scan.units[i].index);
        EXPECT_EQ(list.units[i].encoding, scan.units[i].encoding);
        EXPECT_TRUE(std::ranges::equal(list.units[i].data, scan.units[i].data));
      }
      EXPECT_EQ(list.hashes, scan.hashes);
      EXPECT_EQ(list.encodedBytes, scan.encodedBytes);
      byList.acknowledge(list);
      byScan.acknowledge(scan);
    }
  }
}

/// Random bytes in some units, zero in some, a copy of unit 3 in others.
void fillForPool(ImageFile& image, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> unit(kUnitSize), three(kUnitSize, std::byte{3});
  for (std::uint64_t i = 0; i < image.units(); ++i) {
    switch (rng() % 5) {
      case 0: continue;  // unchanged
      case 1: std::fill(unit.begin(), unit.end(), std::byte{0}); break;
      case 2: unit = three; break;
      default:
        std::memcpy(unit.data(), image.unit(i).data(), kUnitSize);
        for (int k = 0; k < 40; ++k) unit[rng() % kUnitSize] = static_cast<std::byte>(rng());
    }
    image.writeUnit(i, unit);
  }
}

// The chunks must not depend on how many threads built them: same encodings,
// same SAME_AS positions, same bytes, in index order.
TEST(ImageTracker, ThreadPoolSizeDoesNotChangeTheCheckpoint) {
  TempDir dir;
  constexpr std::uint64_t kUnits = 3000;  // several scan tasks and many encode tasks
  ImageFile source(dir.file("src"), true, kUnits * kUnitSize);
  ThreadPool one(1), four(4);
  for (auto policy : {wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV}) {
    ImageTracker serial(source, hashAllUnits(source), policy, true,
                        std::vector<std::byte>(source.bytes().begin(), source.bytes().end()));
    ImageTracker parallel(source, hashAllUnits(source), policy, true,
                          std::vector<std::byte>(source.bytes().begin(), source.bytes().end()));
    serial.setThreadPool(one);
    parallel.setThreadPool(four);
    for (std::uint32_t round = 1; round <= 3; ++round) {
      fillForPool(source, round);
      ImageDelta a = serial.collect(DirtyUnits{.everything = true});
      ImageDelta b = parallel.collect(DirtyUnits{.everything = true});
      ASSERT_EQ(a.units.size(), b.units.size());
      ASSERT_GT(a.units.size(), 100u);
      for (std::size_t i = 0; i < a.units.size(); ++i) {
        EXPECT_EQ(a.units[i].index, b.units[i].index);
        EXPECT_EQ(a.units[i].encoding, b.units[i].encoding);
        EXPECT_EQ(a.units[i].sameAs, b.units[i].sameAs);
        EXPECT_TRUE(std::ranges::equal(a.units[i].data, b.units[i].data));
      }
      EXPECT_EQ(a.hashes, b.hashes);
      EXPECT_TRUE(std::equal(a.raw.begin(), a.raw.end(), b.raw.begin(), b.raw.end()));
      EXPECT_EQ(a.encodedBytes, b.encodedBytes);
      // Blobs too: the messages are the same bytes.
      EXPECT_GT(a.blobs.size(), 1u);
      capnp::MallocMessageBuilder ma, mb;
      toWire(a, ImageDelta{}, ma.initRoot<wire::Checkpoint>());
      toWire(b, ImageDelta{}, mb.initRoot<wire::Checkpoint>());
      EXPECT_TRUE(capnp::messageToFlatArray(ma).asBytes() ==
                  capnp::messageToFlatArray(mb).asBytes());
      serial.acknowledge(a);
      parallel.acknowledge(b);
    }
  }
}

// A resumable point copies the changed units while the VM is paused and
// encodes them after it runs again: the checkpoint is the one collect() makes
// of the image as it was, whatever the guest writes after the copy.
TEST(ImageTracker, CopyingUnderThePauseAndEncodingAfterBuildsWhatCollectBuilds) {
  TempDir dir;
  constexpr std::uint64_t kUnits = 3000;
  ImageFile source(dir.file("src"), true, kUnits * kUnitSize);
  ImageFile twin(dir.file("twin"), true, kUnits * kUnitSize);
  for (auto policy : {wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV}) {
    ImageTracker now(twin, hashAllUnits(twin), policy, true,
                     std::vector<std::byte>(twin.bytes().begin(), twin.bytes().end()));
    ImageTracker later(source, hashAllUnits(source), policy, true,
                       std::vector<std::byte>(source.bytes().begin(), source.bytes().end()));
    for (std::uint32_t round = 1; round <= 3; ++round) {
      fillForPool(source, round);
      fillForPool(twin, round);
      ImageDelta a = now.collect(DirtyUnits{.everything = true});
      ImageDelta b = later.copyChanged(DirtyUnits{.everything = true});
      EXPECT_EQ(b.encodedBytes, 0u) << "nothing is encoded under the pause";
      fillForPool(source, round + 10);  // the guest runs on before the encoding
      later.encode(b);
      ASSERT_EQ(a.units.size(), b.units.size());
      ASSERT_GT(a.units.size(), 100u);
      EXPECT_EQ(a.hashes, b.hashes);
      EXPECT_EQ(a.encodedBytes, b.encodedBytes);
      capnp::MallocMessageBuilder ma, mb;
      toWire(a, ImageDelta{}, ma.initRoot<wire::Checkpoint>());
      toWire(b, ImageDelta{}, mb.initRoot<wire::Checkpoint>());
      EXPECT_TRUE(capnp::messageToFlatArray(ma).asBytes() == capnp::messageToFlatArray(mb).asBytes())
          << "policy " << static_cast<int>(policy) << ", round " << round;
      now.acknowledge(a);
      later.acknowledge(b);
      for (std::uint64_t i = 0; i < kUnits; ++i) source.writeUnit(i, twin.unit(i));  // as it was shipped
    }
  }
}

// The payloads go into the message as blobs that point at the delta's memory:
// not copied, packed without gaps (units dropped or sent as SAME_AS leave none),
// and the message, flattened as the wire carries it, applies to the source's bytes.
TEST(CheckpointMessage, PayloadsAreBlobsTheMessageReferencesNotCopies) {
  TempDir dir;
  constexpr std::uint64_t kUnits = 3000;
  ImageFile source(dir.file("src"), true, kUnits * kUnitSize);
  ImageFile disk(dir.file("disk"), true, 300 * kUnitSize);
  fillForPool(source, 1);
  fillForPool(disk, 2);
  std::mt19937 rng(3);
  std::vector<std::byte> noise(kUnitSize);
  for (std::uint64_t i = 0; i < kUnits; i += 7) {  // incompressible units, sent whole
    for (auto& b : noise) b = static_cast<std::byte>(rng());
    source.writeUnit(i, noise);
  }
  ImageTracker ramTracker(source,
                          hashAllUnits(ImageFile(dir.file("zeros"), true, kUnits * kUnitSize)),
                          wire::Policy::DIRTY_PREV, true);
  ImageTracker diskTracker(disk, hashAllUnits(ImageFile(dir.file("zeros2"), true, 300 * kUnitSize)),
                           wire::Policy::DIRTY_PREV, true);
  ImageDelta memory = ramTracker.collect(DirtyUnits{.everything = true});
  ImageDelta blocks = diskTracker.collect(DirtyUnits{.everything = true});
  std::size_t sameAs = 0, whole = 0;
  for (const auto& unit : memory.units) {
    sameAs += unit.encoding == wire::ChunkEncoding::SAME_AS;
    whole +=
        unit.encoding == wire::ChunkEncoding::WHOLE && unit.compression == wire::Compression::NONE;
  }
  ASSERT_GT(sameAs, 100u);
  ASSERT_GT(whole, 100u);
  std::uint64_t blobBytes = 0;
  for (auto blob : memory.blobs) blobBytes += blob.size();
  EXPECT_EQ(blobBytes, memory.encodedBytes) << "blobs hold exactly the payloads";

  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  toWire(memory, blocks, checkpoint);
  ASSERT_EQ(checkpoint.getBlobs().size(), memory.blobs.size() + blocks.blobs.size());
  std::vector<const void*> segments;
  for (auto segment : message.getSegmentsForOutput()) segments.push_back(segment.begin());
  for (const ImageDelta* delta : {&memory, &blocks})
    for (auto blob : delta->blobs)
      EXPECT_NE(std::find(segments.begin(), segments.end(), static_cast<const void*>(blob.data())),
                segments.end())
          << "a blob of " << blob.size() << " bytes was copied into the message";
  for (auto chunk : checkpoint.getDisk())
    if (chunk.getEncoding() != wire::ChunkEncoding::ZERO &&
        chunk.getEncoding() != wire::ChunkEncoding::SAME_AS) {
      EXPECT_GT(chunk.getBlob(), memory.blobs.size()) << "disk chunks name the disk's blobs";
      EXPECT_EQ(chunk.getData().size(), 0u);
    }

  auto words = capnp::messageToFlatArray(message);
  capnp::FlatArrayMessageReader reader(words,
                                       capnp::ReaderOptions{.traversalLimitInWords = 1u << 30});
  ImageFile ram(dir.file("ram"), true, kUnits * kUnitSize);
  ImageFile receivedDisk(dir.file("rdisk"), true, 300 * kUnitSize);
  applyCheckpoint(reader.getRoot<wire::Checkpoint>(), ram, receivedDisk);
  EXPECT_EQ(hashAllUnits(ram), hashAllUnits(source));
  EXPECT_EQ(hashAllUnits(receivedDisk), hashAllUnits(disk));
}


// The state kept per unit of image, as the class comment states it per GiB:
// 8 bytes of receiver hash, 8 more of base hash under Orig, 2 bits of bitmaps,
// and under Diff Prev the 4096-byte reference copy.
TEST(ImageTracker, StateStaysWithinItsStatedBoundPerUnit) {
  TempDir dir;
  constexpr std::uint64_t kUnits = 4096;  // 16 MiB
  ImageFile source(dir.file("src"), true, kUnits * kUnitSize);
  ImageFile base(dir.file("base"), true, kUnits * kUnitSize);
  auto bound = [&](std::uint64_t hashBytes, std::uint64_t referenceBytes) {
    return kUnits * (hashBytes + referenceBytes) + kUnits / 4 + 64;
  };
  for (auto policy : {wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV, wire::Policy::DIRTY_ORIG,
                      wire::Policy::DIFF_ORIG}) {
    ImageTracker tracker(source, std::vector<std::uint64_t>(kUnits, zeroUnitHash()), policy, true);
    tracker.setBase(base);
    writeUnit(dir.file("src"), 9, 'x');
    ImageDelta delta = tracker.collect(DirtyUnits{.units = {9}});
    tracker.retryLater(delta);
    tracker.acknowledge(tracker.collect(DirtyUnits{.everything = true}));
    const std::uint64_t hashBytes = isOrigPolicy(policy) ? 16 : 8;
    const std::uint64_t referenceBytes = policy == wire::Policy::DIFF_PREV ? kUnitSize : 0;
    // Prev's content index: 4 bytes a slot, at most 4 slots per unit once
    // past its first 1024.
    const std::uint64_t contentIndexBytes = isOrigPolicy(policy) ? 0 : std::max<std::uint64_t>(4096, kUnits * 16);
    EXPECT_LE(tracker.stateBytes(), bound(hashBytes, referenceBytes) + contentIndexBytes) << policyName(policy);
    EXPECT_GE(tracker.stateBytes(), kUnits * (hashBytes + referenceBytes)) << policyName(policy);
  }
}

TEST(ThreadPool, EveryItemOnceAndErrorsReachTheCaller) {
  ThreadPool pool(3);
  std::vector<std::atomic<int>> seen(10007);
  pool.parallelFor(seen.size(), 64, [&](std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) seen[i]++;
  });
  for (auto& s : seen) EXPECT_EQ(s.load(), 1);
  EXPECT_THROW(pool.parallelFor(1000, 10,
                                [](std::size_t begin, std::size_t) {
                                  if (begin == 500) fail("chunk at {}", begin);
                                }),
               Error);
  // A loop inside a chunk runs inline instead of waiting for its own pool.
  std::atomic<std::size_t> inner{0};
  pool.parallelFor(8, 1, [&](std::size_t, std::size_t) {
    pool.parallelFor(50, 5, [&](std::size_t begin, std::size_t end) { inner += end - begin; });
  });
  EXPECT_EQ(inner.load(), 400u);
  // The pool still works after an error.
  std::atomic<std::size_t> total{0};
  pool.parallelFor(100, 7, [&](std::size_t begin, std::size_t end) { total += end - begin; });
  EXPECT_EQ(total.load(), 100u);
}

TEST(ImageTracker, RejectsUnitsPastTheImage) {
  TempDir dir;
  ImageFile source(dir.file("source"), true, 4 * kUnitSize);
  ImageTracker tracker(source, std::vector<std::uint64_t>(4, zeroUnitHash()), wire::Policy::DIRTY_PREV, false);
  EXPECT_THROW(tracker.collect(DirtyUnits{.units = {4}}), Error);
}

TEST(ImageTracker, BadReportAfterAFailedPushKeepsTheRetries) {
  TempDir dir;
  ImageFile source(dir.file("source"), true, 4 * kUnitSize);
  ImageTracker tracker(source, std::vector<std::uint64_t>(4, zeroUnitHash()), wire::Policy::DIRTY_PREV, false);
  writeUnit(dir.file("source"), 2, 'r');
  tracker.retryLater(tracker.collect(DirtyUnits{.units = {2}}));
  EXPECT_THROW(tracker.collect(DirtyUnits{.units = {4}}), Error);
  ImageDelta again = tracker.collect(DirtyUnits{});
  ASSERT_EQ(again.units.size(), 1u);
  EXPECT_EQ(again.units[0].index, 2u);
}


}  // namespace
}  // namespace vmsync
