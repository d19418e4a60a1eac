// Forwarding to a standby that is slower than the checkpoints: what piles up
// while it applies one checkpoint travels as one merge, so it catches up
// instead of falling further behind with every push.
#include <capnp/message.h>
#include <gtest/gtest.h>
#include <kj/async.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "sync_server.h"
#include "test_checkpoint.h"
#include "test_env.h"

namespace vmsync {
namespace {

using testing::TempDir;

/// A standby whose applies finish only when the test says so.
class SlowStandby final : public wire::DevicePeer::Server {
 public:
  struct Received {
    std::uint64_t sequence;
    std::uint64_t base;
    std::size_t units;
  };
  std::vector<Received> received;

  /// Lets the oldest apply under way finish.
  void finishOne() {
    ASSERT_FALSE(pending_.empty());
    auto [fulfiller, sequence] = kj::mv(pending_.front());
    pending_.erase(pending_.begin());
    fulfiller->fulfill(kj::cp(sequence));
  }
  std::size_t underWay() const { return pending_.size(); }

 protected:
  kj::Promise<void> apply(ApplyContext context) override {
    auto checkpoint = context.getParams().getCheckpoint();
    received.push_back({checkpoint.getSequence(), checkpoint.getBaseSequence(), checkpoint.getMemory().size()});
    auto paf = kj::newPromiseAndFulfiller<std::uint64_t>();
    pending_.emplace_back(kj::mv(paf.fulfiller), checkpoint.getSequence());
    return paf.promise.then([context](std::uint64_t sequence) mutable {
      context.getResults().setAppliedSequence(sequence);
    });
  }

 private:
  std::vector<std::pair<kj::Own<kj::PromiseFulfiller<std::uint64_t>>, std::uint64_t>> pending_;
};

TEST(ServerForward, WhatPilesUpWhileAStandbyAppliesTravelsAsOneMerge) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  SyncServer server(dir.path());
  const std::uint64_t epoch = server.acquireLease("A");
  auto full = testCheckpoint(1, epoch);
  ASSERT_EQ(server.push("A", full->getRoot<wire::Checkpoint>().asReader()), 1u);

  auto standby = kj::heap<SlowStandby>();
  SlowStandby& b = *standby;
  wire::DevicePeer::Client peer = kj::mv(standby);
  server.registerDevice("B", peer, 0, 0, false).wait(waitScope);
  loop.run();
  ASSERT_EQ(b.received.size(), 1u);  // the full checkpoint, still being applied

  // Four checkpoints come while B applies the first.
  for (std::uint64_t s = 2; s <= 5; ++s) {
    auto pushed = testCheckpoint(s, epoch);
    ASSERT_EQ(server.push("A", pushed->getRoot<wire::Checkpoint>().asReader()), s);
    loop.run();
  }
  ASSERT_EQ(b.received.size(), 1u) << "a second apply was sent before the first finished";

  b.finishOne();
  loop.run();
  // The next apply is 2..5 merged: sequence 5 on base 1 with all four units.
  ASSERT_EQ(b.received.size(), 2u);
  EXPECT_EQ(b.received[1].sequence, 5u);
  EXPECT_EQ(b.received[1].base, 1u);
  EXPECT_EQ(b.received[1].units, 4u);
  b.finishOne();
  loop.run();
  // Nothing more to send: B is at the head.
  EXPECT_EQ(b.received.size(), 2u);
  EXPECT_EQ(b.underWay(), 0u);
}

}  // namespace
}  // namespace vmsync
