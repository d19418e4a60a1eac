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

/// A checkpoint with one blob of 8 bytes and one memory chunk, which `edit` sets up.
template <typename Edit>
void applyWithBlobChunk(Edit edit, const std::string& expected) {
  TempDir dir;
  ImageFile ram(dir.file("ram"), true, 4 * kUnitSize);
  ImageFile disk(dir.file("disk"), true, kUnitSize);
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
  EXPECT_EQ(hashAllUnits(ram), hashAllUnits(ImageFile(dir.file("zeros"), true, 4 * kUnitSize)));
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
    EXPECT_LE(tracker.stateBytes(), bound(hashBytes, referenceBytes)) << policyName(policy);
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

TEST(ApplyCheckpoint, OutOfRangeChunkIsRejectedAndNothingIsWritten) {
  TempDir dir;
  ImageFile ram(dir.file("ram"), true, 4 * kUnitSize);
  ImageFile disk(dir.file("disk"), true, 4 * kUnitSize);
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
  ImageFile ram(dir.file("ram"), true, 8 * kUnitSize);
  ImageFile disk(dir.file("disk"), true, kUnitSize);
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
  ImageFile ram(dir.file("ram"), true, 8 * kUnitSize);
  ImageFile disk(dir.file("disk"), true, kUnitSize);
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
  ImageFile ram(dir.file("ram"), true, 2 * kUnitSize);
  ImageFile disk(dir.file("disk"), true, 2 * kUnitSize);
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
    ImageFile ram(dir.file("ram" + std::to_string(units)), true, units * kUnitSize);
    ImageFile disk(dir.file("disk" + std::to_string(units)), true, kUnitSize);
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
