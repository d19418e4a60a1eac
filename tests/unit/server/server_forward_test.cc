// Forwarding to a standby that is slower than the checkpoints: what piles up
// while it applies one checkpoint travels as one merge, so it catches up
// instead of falling further behind with every push.
#include <capnp/message.h>
#include <gtest/gtest.h>
#include <kj/async.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "base/units.h"
#include "sync_server.h"
#include "test_env.h"

namespace vmsync {
namespace {

using testing::TempDir;

/// A checkpoint of VM "vm" whose one memory chunk (unit `sequence`) holds `sequence`.
struct Built {
  capnp::MallocMessageBuilder message;
  wire::Checkpoint::Builder root = message.initRoot<wire::Checkpoint>();

  Built(std::uint64_t sequence, std::uint64_t epoch) {
    root.setVmId("vm");
    root.setEpoch(epoch);
    root.setSequence(sequence);
    root.setBaseSequence(sequence - 1);
    root.setKind(sequence == 1 ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
    if (sequence == 1) {
      auto spec = root.initSpec();
      spec.setVmId("vm");
      spec.setMemoryBytes(16 * kUnitSize);
      spec.setDiskBytes(16 * kUnitSize);
    }
    auto memory = root.initMemory(1);
    memory[0].setIndex(sequence);
    memory[0].setEncoding(wire::ChunkEncoding::WHOLE);
    auto data = memory[0].initData(kUnitSize);
    std::fill(data.begin(), data.end(), static_cast<std::uint8_t>(sequence));
  }
};

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
  Built full(1, epoch);
  ASSERT_EQ(server.push("A", full.root.asReader()), 1u);

  auto standby = kj::heap<SlowStandby>();
  SlowStandby& b = *standby;
  wire::DevicePeer::Client peer = kj::mv(standby);
  server.registerDevice("B", peer, 0, 0, false).wait(waitScope);
  loop.run();
  ASSERT_EQ(b.received.size(), 1u);  // the full checkpoint, still being applied

  // Four checkpoints come while B applies the first.
  std::vector<std::unique_ptr<Built>> pushed;
  for (std::uint64_t s = 2; s <= 5; ++s) {
    pushed.push_back(std::make_unique<Built>(s, epoch));
    ASSERT_EQ(server.push("A", pushed.back()->root.asReader()), s);
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
