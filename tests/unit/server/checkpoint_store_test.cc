#include "checkpoint_store.h"

#include <capnp/serialize.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "checkpoint/checkpoint_record.h"
#include "base/error.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/vmsync-store-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
};

void appendOne(CheckpointStore& store, std::uint64_t sequence, std::uint64_t epoch = 0) {
  capnp::MallocMessageBuilder message;
  auto c = message.initRoot<wire::Checkpoint>();
  c.setEpoch(epoch);
  c.setSequence(sequence);
  c.setBaseSequence(sequence - 1);
  c.setVmId("vm");
  store.append(c.asReader());
}

// A standby's journal is written from the message's segments, with the
// segment table made here: it must read back as the flat message would. So
// must a fold's new base, written in windows each on the disk before the
// next: windows smaller than a segment, across segments and larger than the
// file.
TEST(CheckpointRecord, AMessageWrittenFromItsSegmentsReadsBackAsItsFlatArray) {
  TempDir dir;
  // One blob per segment (segments of one word, each blob bigger): 2, 3 and
  // more segments than one write takes (IOV_MAX), which is flattened first.
  for (unsigned blobs : {1u, 2u, 7u, 1100u}) {
    SCOPED_TRACE(blobs);
    capnp::MallocMessageBuilder message(1, capnp::AllocationStrategy::FIXED_SIZE);
    auto c = message.initRoot<wire::Checkpoint>();
    c.setSequence(blobs);
    auto list = c.initBlobs(blobs);
    for (unsigned i = 0; i < blobs; ++i) {
      auto blob = list.init(i, 24);
      for (unsigned b = 0; b < blob.size(); ++b) blob[b] = static_cast<kj::byte>(i * 31 + b);
    }
    ASSERT_GE(message.getSegmentsForOutput().size(), blobs + 1);
    for (std::size_t window : {std::size_t{0}, std::size_t{13}, std::size_t{4096}, std::size_t{1} << 20}) {
      SCOPED_TRACE(window);
      const std::string path = dir.path + "/journal";
      writeMessageRecordFile(path, message, /*crashPoints=*/false, window);
      std::string why;
      KJ_IF_MAYBE (words, readRecordFile(path, why)) {
        auto expected = capnp::messageToFlatArray(message);
        ASSERT_EQ(words->size(), expected.size());
        EXPECT_EQ(std::memcmp(words->begin(), expected.begin(), expected.asBytes().size()), 0);
        capnp::FlatArrayMessageReader reader(*words);
        EXPECT_EQ(reader.getRoot<wire::Checkpoint>().getBlobs()[blobs - 1][23],
                  static_cast<kj::byte>((blobs - 1) * 31 + 23));
      } else {
        FAIL() << "the record does not read back: " << why;
      }
      fs::remove(path);
    }
  }
}

TEST(CheckpointStore, ChainAndStateSurviveReopening) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    appendOne(store, 1);
    appendOne(store, 2);
    ServerState state;
    state.vmId = "vm";
    state.epoch = 3;
    state.holder = "phone";
    state.appliedByDevice = {{"phone", 2}, {"tablet", 1}};
    store.saveState(state);
  }
  CheckpointStore store(dir.path);
  EXPECT_EQ(store.head(), 2u);
  EXPECT_EQ(store.read(2)->reader().getSequence(), 2u);
  EXPECT_EQ(store.state().epoch, 3u);
  EXPECT_EQ(store.state().holder, "phone");
  EXPECT_EQ(store.state().appliedByDevice.at("tablet"), 1u);
}

TEST(CheckpointStore, AFailoverRecordedButCutShortBeforeItsMovesIsFinishedAtStart) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    for (std::uint64_t s = 1; s <= 5; ++s) appendOne(store, s, 1);
    // What a failover to checkpoint 3 persists before it moves anything.
    ServerState state = store.state();
    state.vmId = "vm";
    state.epoch = 2;
    state.failovers = {{3, 2}};
    state.abandonedAfter = 3;
    state.abandonedUpTo = 5;
    state.appliedByDevice = {{"tablet", 5}};
    store.saveState(state);
  }
  CheckpointStore store(dir.path);
  EXPECT_EQ(store.head(), 3u);
  EXPECT_TRUE(fs::exists(dir.path + "/abandoned/epoch-2-00000004.ckpt"));
  EXPECT_TRUE(fs::exists(dir.path + "/abandoned/epoch-2-00000005.ckpt"));
  EXPECT_EQ(store.state().abandonedTotal, 2u);
  EXPECT_EQ(store.state().appliedByDevice.at("tablet"), 3u);
}

TEST(CheckpointStore, TheChainAfterACompletedFailoverIsLeftAsItIs) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    for (std::uint64_t s = 1; s <= 3; ++s) appendOne(store, s, 1);
    ServerState state = store.state();
    state.epoch = 2;
    state.failovers = {{3, 2}};
    store.saveState(state);
    for (std::uint64_t s = 4; s <= 5; ++s) appendOne(store, s, 2);  // the new lease's
  }
  CheckpointStore store(dir.path);
  EXPECT_EQ(store.head(), 5u);
  EXPECT_FALSE(fs::exists(dir.path + "/abandoned"));
}

TEST(CheckpointStore, TemporaryFileLeftByACrashIsNotPartOfTheChain) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    appendOne(store, 1);
  }
  std::ofstream(dir.path + "/checkpoints/00000000000000000002.ckpt.tmp") << "torn";
  CheckpointStore store(dir.path);
  EXPECT_EQ(store.head(), 1u);
  EXPECT_FALSE(fs::exists(dir.path + "/checkpoints/00000000000000000002.ckpt.tmp"));
}

TEST(CheckpointStore, MissingCheckpointBelowHeadIsReported) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    appendOne(store, 1);
    appendOne(store, 2);
  }
  fs::remove(dir.path + "/checkpoints/00000000000000000001.ckpt");
  EXPECT_THROW(CheckpointStore store(dir.path), Error);
}

std::string path(const TempDir& dir, std::uint64_t sequence) {
  return fmt::format("{}/checkpoints/{:020}.ckpt", dir.path, sequence);
}

/// Flips one byte of a stored file at `offset` from its end.
void flipByteFromEnd(const std::string& file, std::uint64_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(-static_cast<std::streamoff>(offset), std::ios::end);
  char c = 0;
  f.read(&c, 1);
  f.seekp(-static_cast<std::streamoff>(offset), std::ios::end);
  c = static_cast<char>(c ^ 0x5a);
  f.write(&c, 1);
}

/// Opening `dir` refuses with an error that names checkpoint `s` as the damaged head.
void expectDamagedHeadRefused(const TempDir& dir, std::uint64_t s) {
  try {
    CheckpointStore store(dir.path);
    ADD_FAILURE() << "a damaged head was dropped without being asked to";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("checkpoint {}, the head of the chain, is damaged", s)),
              std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("--set-aside-damaged-head"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::exists(path(dir, s))) << "the refused record was moved";
}

TEST(CheckpointStore, ATruncatedHeadIsRefusedAndSetAsideOnlyWhenAsked) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    appendOne(store, 1);
    appendOne(store, 2);
  }
  fs::resize_file(path(dir, 2), fs::file_size(path(dir, 2)) - 8);
  // Committed before it was acknowledged: it may have been, so it is not
  // dropped on the quiet.
  expectDamagedHeadRefused(dir, 2);
  CheckpointStore store(dir.path, StoreRecovery{.setAsideDamagedHead = true});
  EXPECT_EQ(store.head(), 1u);
  EXPECT_THROW(store.read(2), Error);
  EXPECT_TRUE(fs::exists(path(dir, 2) + ".damaged"));  // kept for whoever looks into it
  appendOne(store, 2);  // the chain goes on from the last whole record
  EXPECT_EQ(store.read(2)->reader().getSequence(), 2u);
}

TEST(CheckpointStore, AChecksumMismatchAtTheHeadIsRefusedAndSetAsideOnlyWhenAsked) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    appendOne(store, 1);
    appendOne(store, 2);
  }
  flipByteFromEnd(path(dir, 2), 3);
  expectDamagedHeadRefused(dir, 2);
  CheckpointStore store(dir.path, StoreRecovery{.setAsideDamagedHead = true});
  EXPECT_EQ(store.head(), 1u);
}

TEST(CheckpointStore, DamageBelowTheTailIsAnErrorNotASilentTruncation) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    for (std::uint64_t s = 1; s <= 3; ++s) appendOne(store, s);
  }
  flipByteFromEnd(path(dir, 2), 3);
  try {
    CheckpointStore store(dir.path);
    FAIL() << "a damaged record below the tail was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoint 2 is damaged"), std::string::npos) << e.what();
  }
}

TEST(CheckpointStore, ReadVerifiesTheChecksum) {
  TempDir dir;
  CheckpointStore store(dir.path);
  appendOne(store, 1);
  appendOne(store, 2);
  flipByteFromEnd(path(dir, 1), 3);
  EXPECT_THROW(store.read(1), Error);
}

TEST(CheckpointStore, FileWithoutRecordHeaderIsRefused) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    appendOne(store, 1);
  }
  std::ofstream(path(dir, 2), std::ios::binary) << std::string(64, 'x');
  expectDamagedHeadRefused(dir, 2);
  CheckpointStore store(dir.path, StoreRecovery{.setAsideDamagedHead = true});
  EXPECT_EQ(store.head(), 1u);
}

TEST(CheckpointStore, DeviceStateIsClampedToAHeadSetAside) {
  TempDir dir;
  {
    CheckpointStore store(dir.path);
    appendOne(store, 1);
    appendOne(store, 2);
    ServerState state;
    state.appliedByDevice = {{"phone", 2}};
    store.saveState(state);
  }
  fs::resize_file(path(dir, 2), 10);
  {
    CheckpointStore store(dir.path, StoreRecovery{.setAsideDamagedHead = true});
    EXPECT_EQ(store.state().appliedByDevice.at("phone"), 1u);
  }
  // Abandoned as by a failover, and on disk: the next start knows without
  // being asked again that a device at 2 is past the chain.
  CheckpointStore store(dir.path);
  EXPECT_EQ(store.head(), 1u);
  EXPECT_EQ(store.state().abandonedAfter, 1u);
  EXPECT_EQ(store.state().abandonedUpTo, 2u);
  EXPECT_EQ(store.state().epoch, 1u);
  EXPECT_EQ(store.state().holder, "");
  ASSERT_EQ(store.state().failovers.size(), 1u);
  EXPECT_EQ(store.state().failovers[0], std::make_pair(std::uint64_t{1}, std::uint64_t{1}));
}

}  // namespace
}  // namespace vmsync
