#include "checkpoint_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "error.h"

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

void appendOne(CheckpointStore& store, std::uint64_t sequence) {
  capnp::MallocMessageBuilder message;
  auto c = message.initRoot<wire::Checkpoint>();
  c.setSequence(sequence);
  c.setBaseSequence(sequence - 1);
  c.setVmId("vm");
  store.append(c.asReader());
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

}  // namespace
}  // namespace vmsync
