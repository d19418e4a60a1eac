// The store's disk work off the event loop: a VM whose write is held does
// not hold up another VM's push; one VM's pushes are still stored one at a
// time, in order; an error on a worker comes back with its message; and a
// state save that was overtaken never puts an older state on disk.
#include <gtest/gtest.h>
#include <kj/async-io.h>

#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>

#include "base/error.h"
#include "store_workers.h"
#include "sync_server.h"
#include "test_checkpoint.h"
#include "test_env.h"
#include "transport/rpc_util.h"

namespace vmsync {
namespace {

using testing::TempDir;

class Standby final : public wire::DevicePeer::Server {};

/// Checkpoint `sequence` of VM "vm" from device A under lease `epoch`.
kj::Own<capnp::MallocMessageBuilder> checkpointOf(std::uint64_t sequence, std::uint64_t epoch) {
  return testCheckpoint(sequence, epoch);
}

/// A server for one VM in `dir` whose device A holds the lease.
struct RunningVm {
  RunningVm(const std::string& dir, kj::Timer& timer, kj::WaitScope& waitScope) : server(dir, {}, &timer) {
    server.registerDevice("A", kj::heap<Standby>(), 0).wait(waitScope);
    epoch = server.acquireLease("A");
  }
  SyncServer server;
  std::uint64_t epoch = 0;
};

/// Holds the writes of checkpoints whose path contains `held` until
/// release() (or a minute passed, which it records).
class WriteGate {
 public:
  explicit WriteGate(std::string held) : held_(std::move(held)) {
    CheckpointStore::beforeAppendWriteForTests = [this](const std::string& path) {
      if (path.find(held_) == std::string::npos) return;
      std::unique_lock lock(mutex_);
      ++waiting_;
      if (!cv_.wait_for(lock, std::chrono::minutes(1), [this] { return released_; })) timedOut_ = true;
    };
  }
  ~WriteGate() { CheckpointStore::beforeAppendWriteForTests = nullptr; }
  void release() {
    std::lock_guard lock(mutex_);
    released_ = true;
    cv_.notify_all();
  }
  int waiting() {
    std::lock_guard lock(mutex_);
    return waiting_;
  }
  bool timedOut() {
    std::lock_guard lock(mutex_);
    return timedOut_;
  }

 private:
  std::string held_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool released_ = false, timedOut_ = false;
  int waiting_ = 0;
};

TEST(StoreOrder, AnotherVmsPushIsStoredWhileOneVmsWriteIsHeld) {
  auto io = kj::setupAsyncIo();
  TempDir dir;
  RunningVm slow(dir.path() + "/slow", io.provider->getTimer(), io.waitScope);
  RunningVm quick(dir.path() + "/quick", io.provider->getTimer(), io.waitScope);
  auto slowFull = checkpointOf(1, slow.epoch), quickFull = checkpointOf(1, quick.epoch);
  ASSERT_EQ(slow.server.pushAsync("A", slowFull->getRoot<wire::Checkpoint>().asReader()).wait(io.waitScope), 1u);
  ASSERT_EQ(quick.server.pushAsync("A", quickFull->getRoot<wire::Checkpoint>().asReader()).wait(io.waitScope), 1u);

  WriteGate gate("/slow/");
  auto slowNext = checkpointOf(2, slow.epoch), quickNext = checkpointOf(2, quick.epoch);
  auto slowPush = slow.server.pushAsync("A", slowNext->getRoot<wire::Checkpoint>().asReader());
  // The slow VM's write has begun and waits.
  while (gate.waiting() == 0) io.provider->getTimer().afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
  EXPECT_EQ(quick.server.pushAsync("A", quickNext->getRoot<wire::Checkpoint>().asReader()).wait(io.waitScope), 2u);
  EXPECT_EQ(quick.server.head(), 2u);
  EXPECT_EQ(slow.server.head(), 1u) << "the held checkpoint became the head before it was written";
  gate.release();
  EXPECT_EQ(slowPush.wait(io.waitScope), 2u);
  EXPECT_EQ(slow.server.head(), 2u);
  EXPECT_FALSE(gate.timedOut()) << "the other VM's push waited for the held write";
}

TEST(StoreOrder, PastTheServersLimitOfPushesAPushWaitsForOneToFinish) {
  auto io = kj::setupAsyncIo();
  TempDir dir;
  RunningVm slow(dir.path() + "/slow", io.provider->getTimer(), io.waitScope);
  RunningVm quick(dir.path() + "/quick", io.provider->getTimer(), io.waitScope);
  auto slots = std::make_shared<ServerBudget>(1);
  slow.server.setPushSlots(slots);
  quick.server.setPushSlots(slots);
  WriteGate gate("/slow/");
  auto slowFull = checkpointOf(1, slow.epoch), quickFull = checkpointOf(1, quick.epoch);
  auto slowPush = slow.server.pushAsync("A", slowFull->getRoot<wire::Checkpoint>().asReader());
  while (gate.waiting() == 0) io.provider->getTimer().afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
  auto quickPush = quick.server.pushAsync("A", quickFull->getRoot<wire::Checkpoint>().asReader());
  io.provider->getTimer().afterDelay(100 * kj::MILLISECONDS).wait(io.waitScope);
  EXPECT_EQ(quick.server.head(), 0u) << "a second push was stored while the only slot was taken";
  EXPECT_EQ(slots->waiting(), 1u);
  gate.release();
  EXPECT_EQ(slowPush.wait(io.waitScope), 1u);
  EXPECT_EQ(quickPush.wait(io.waitScope), 1u);
  EXPECT_EQ(slots->used(), 0u);
}

TEST(StoreOrder, OneVmsPushesAreStoredOneAtATimeInOrder) {
  auto io = kj::setupAsyncIo();
  TempDir dir;
  RunningVm vm(dir.path() + "/vm", io.provider->getTimer(), io.waitScope);
  std::vector<kj::Own<capnp::MallocMessageBuilder>> messages;
  kj::Vector<kj::Promise<std::uint64_t>> pushes;
  WriteGate gate("/vm/");
  for (std::uint64_t s = 1; s <= 4; ++s) {
    messages.push_back(checkpointOf(s, vm.epoch));
    pushes.add(vm.server.pushAsync("A", messages.back()->getRoot<wire::Checkpoint>().asReader()));
  }
  while (gate.waiting() == 0) io.provider->getTimer().afterDelay(1 * kj::MILLISECONDS).wait(io.waitScope);
  // Three more are queued behind the held one, and none of them was written.
  io.provider->getTimer().afterDelay(50 * kj::MILLISECONDS).wait(io.waitScope);
  EXPECT_EQ(gate.waiting(), 1);
  gate.release();
  for (std::uint64_t s = 1; s <= 4; ++s) EXPECT_EQ(pushes[s - 1].wait(io.waitScope), s);
  EXPECT_EQ(vm.server.head(), 4u);
  EXPECT_EQ(gate.waiting(), 4);
}

TEST(StoreOrder, ARefusedPushDoesNotStopTheOnesAfterIt) {
  auto io = kj::setupAsyncIo();
  TempDir dir;
  RunningVm vm(dir.path() + "/vm", io.provider->getTimer(), io.waitScope);
  auto full = checkpointOf(1, vm.epoch), gap = checkpointOf(3, vm.epoch), next = checkpointOf(2, vm.epoch);
  auto first = vm.server.pushAsync("A", full->getRoot<wire::Checkpoint>().asReader());
  auto refused = vm.server.pushAsync("A", gap->getRoot<wire::Checkpoint>().asReader());
  auto second = vm.server.pushAsync("A", next->getRoot<wire::Checkpoint>().asReader());
  EXPECT_EQ(first.wait(io.waitScope), 1u);
  std::string why;
  refused.then([](std::uint64_t) {}, [&why](kj::Exception&& e) { why = describe(e); }).wait(io.waitScope);
  EXPECT_NE(why.find("checkpoint 3 (based on 2) rejected: the chain ends at 1"), std::string::npos) << why;
  EXPECT_EQ(second.wait(io.waitScope), 2u);
}

TEST(StoreWorkers, AnErrorComesBackWithItsMessage) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  StoreWorkers workers(2);
  std::string why;
  workers.run([] { fail("cannot write {}: no space left on device", "00000000000000000007.ckpt"); })
      .then([] {}, [&why](kj::Exception&& e) { why = describe(e); })
      .wait(waitScope);
  EXPECT_EQ(why, "cannot write 00000000000000000007.ckpt: no space left on device");
  bool ran = false;
  workers.run([&ran] { ran = true; }).wait(waitScope);
  EXPECT_TRUE(ran);
}

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(StoreWorkers, AStateSaveThatWasOvertakenWritesNothing) {
  TempDir dir;
  CheckpointStore store(dir.path());
  ServerState older, newer;
  older.epoch = 4;
  older.holder = "phone";
  newer.epoch = 5;
  newer.holder = "laptop";
  auto late = store.saveStateLater(older);
  store.saveState(newer);
  late();  // the worker got to it only now
  const std::string text = readFile(dir.path() + "/state.json");
  EXPECT_NE(text.find("\"laptop\""), std::string::npos) << text;
  EXPECT_EQ(text.find("\"phone\""), std::string::npos) << text;
  EXPECT_EQ(CheckpointStore(dir.path()).state().epoch, 5u);
}

}  // namespace
}  // namespace vmsync
