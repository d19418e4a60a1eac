// A push re-sent after a cut connection: the server recognises the checkpoint
// it already stored and acknowledges it again, without storing it twice.
#include <capnp/message.h>
#include <gtest/gtest.h>
#include <kj/async.h>

#include <algorithm>
#include <filesystem>
#include <memory>

#include "checkpoint/checkpoint_identity.h"
#include "base/error.h"
#include "sync_server.h"
#include "test_env.h"
#include "base/units.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;

/// A checkpoint of VM "vm" whose one memory chunk holds `tag`.
struct Built {
  capnp::MallocMessageBuilder message;
  wire::Checkpoint::Builder root = message.initRoot<wire::Checkpoint>();

  Built(std::uint64_t sequence, std::uint64_t epoch, std::uint8_t tag) {
    root.setVmId("vm");
    root.setEpoch(epoch);
    root.setSequence(sequence);
    root.setBaseSequence(sequence - 1);
    root.setKind(sequence == 1 ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
    if (sequence == 1) {
      auto spec = root.initSpec();
      spec.setVmId("vm");
      spec.setMemoryBytes(16 * kUnitSize);  // the server checks every chunk against the VM's sizes
      spec.setDiskBytes(16 * kUnitSize);
    }
    auto memory = root.initMemory(1);
    memory[0].setIndex(7);
    memory[0].setEncoding(wire::ChunkEncoding::WHOLE);
    auto data = memory[0].initData(kUnitSize);
    std::fill(data.begin(), data.end(), tag);
  }
  wire::Checkpoint::Reader reader() { return root.asReader(); }
};

std::size_t storedFiles(const std::string& dir) {
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator(dir + "/checkpoints")) n += e.is_regular_file();
  return n;
}

/// A server in a fresh data directory, with device A holding the lease.
class ServerPush : public ::testing::Test {
 protected:
  ~ServerPush() noexcept override {}  // kj::EventLoop's destructor may throw; a test fixture's may not

  /// Starts the server again on the same data directory.
  void restart() {
    server_.reset();
    server_ = std::make_unique<SyncServer>(dir_.path());
  }
  SyncServer& server() { return *server_; }

  kj::EventLoop loop_;
  kj::WaitScope waitScope_{loop_};
  TempDir dir_;
  std::unique_ptr<SyncServer> server_ = std::make_unique<SyncServer>(dir_.path());
  const std::uint64_t epoch_ = server_->acquireLease("A");
};

TEST_F(ServerPush, SamePushAgainIsAcknowledgedNotStoredTwice) {
  Built full(1, epoch_, 1);
  Built second(2, epoch_, 2);
  EXPECT_EQ(server().push("A", full.reader()), 1u);
  EXPECT_EQ(server().push("A", second.reader()), 2u);
  const std::size_t files = storedFiles(dir_.path());

  // The answer to checkpoint 2 was lost; the device sends it again.
  Built again(2, epoch_, 2);
  EXPECT_EQ(server().push("A", again.reader()), 2u);
  EXPECT_EQ(server().head(), 2u);
  EXPECT_EQ(storedFiles(dir_.path()), files);
  // The next checkpoint follows as usual.
  Built third(3, epoch_, 3);
  EXPECT_EQ(server().push("A", third.reader()), 3u);
}

TEST_F(ServerPush, SameSequenceWithOtherContentIsRefused) {
  Built full(1, epoch_, 1);
  Built second(2, epoch_, 2);
  server().push("A", full.reader());
  server().push("A", second.reader());
  Built other(2, epoch_, 9);
  EXPECT_THROW(server().push("A", other.reader()), Error);
  // Only the head is recognised: an older sequence is refused even with its content.
  Built first(1, epoch_, 1);
  EXPECT_THROW(server().push("A", first.reader()), Error);
  EXPECT_EQ(server().head(), 2u);
}

TEST_F(ServerPush, RecognisedAfterTheServerRestarts) {
  Built full(1, epoch_, 1);
  server().push("A", full.reader());
  restart();
  Built again(1, epoch_, 1);
  EXPECT_EQ(server().push("A", again.reader()), 1u);
  EXPECT_EQ(server().head(), 1u);
}

TEST_F(ServerPush, ARepushUnderAnOldEpochIsFenced) {
  Built full(1, epoch_, 1);
  server().push("A", full.reader());
  Built stale(1, epoch_ + 1, 1);  // not the lease's epoch
  EXPECT_THROW(server().push("A", stale.reader()), Error);
}

TEST(CheckpointDigest, IgnoresLayoutAndSeesEveryField) {
  Built a(2, 1, 5);
  capnp::MallocMessageBuilder copy;
  copy.setRoot(a.reader());  // another layout of the same checkpoint
  EXPECT_EQ(checkpointDigest(a.reader()), checkpointDigest(copy.getRoot<wire::Checkpoint>().asReader()));
  Built otherEpoch(2, 2, 5);
  Built otherByte(2, 1, 6);
  EXPECT_NE(checkpointDigest(a.reader()), checkpointDigest(otherEpoch.reader()));
  EXPECT_NE(checkpointDigest(a.reader()), checkpointDigest(otherByte.reader()));
}

}  // namespace
}  // namespace vmsync
