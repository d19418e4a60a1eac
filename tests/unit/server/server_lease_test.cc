// The lease while a switch runs: the holder that asks for it again (back
// from a cut connection) keeps it until its final checkpoint is stored;
// any other device is refused until the switch is over. And a VM a switch
// cut short left parked resumes on the device the switch meant to run it.
#include <capnp/message.h>
#include <gtest/gtest.h>
#include <kj/async.h>
#include <kj/timer.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <thread>

#include "base/error.h"
#include "sync_server.h"
#include "test_checkpoint.h"
#include "test_env.h"

namespace vmsync {
namespace {

using testing::TempDir;

/// A device whose hand-off never finishes: the switch stays under way.
class SlowToHandOff final : public wire::DevicePeer::Server {
 protected:
  kj::Promise<void> handOff(HandOffContext) override { return kj::NEVER_DONE; }
};

/// A device that accepts whatever it is sent.
class Standby final : public wire::DevicePeer::Server {};

TEST(ServerLease, TheHolderKeepsItsLeaseWhileASwitchAwayFromItRuns) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  SyncServer server(dir.path());
  wire::DevicePeer::Client a = kj::heap<SlowToHandOff>();
  wire::DevicePeer::Client b = kj::heap<Standby>();
  wire::DevicePeer::Client c = kj::heap<Standby>();
  server.registerDevice("A", a, 0, 0, false).wait(waitScope);
  server.registerDevice("B", b, 0, 0, false).wait(waitScope);
  server.registerDevice("C", c, 0, 0, false).wait(waitScope);
  const std::uint64_t epoch = server.acquireLease("A");

  capnp::MallocMessageBuilder message;
  auto report = message.initRoot<wire::SwitchReport>();
  auto switching = server.switchTo("B", false, report).eagerlyEvaluate(nullptr);
  loop.run();  // the switch waits for A's hand-off

  // A, back from a cut connection, asks again: same lease, same epoch.
  EXPECT_EQ(server.acquireLease("A"), epoch);
  // Nobody else may take it while the switch runs.
  try {
    server.acquireLease("C");
    ADD_FAILURE() << "C was given the lease during a switch";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a switch is in progress"), std::string::npos) << e.what();
  }
}

/// A standby that applies whatever it is sent, and resumes when asked.
class Resumable final : public wire::DevicePeer::Server {
 public:
  std::uint64_t applied = 0;
  std::uint64_t activatedEpoch = 0;

 protected:
  kj::Promise<void> apply(ApplyContext context) override {
    applied = context.getParams().getCheckpoint().getSequence();
    context.getResults().setAppliedSequence(applied);
    return kj::READY_NOW;
  }
  kj::Promise<void> activate(ActivateContext context) override {
    activatedEpoch = context.getParams().getEpoch();
    return kj::READY_NOW;
  }
};

TEST(ServerLease, AVmASwitchLeftParkedResumesOnItsTargetWhenItIsBack) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  {
    // A ran the VM; the switch to B stored A's final checkpoint, gave up A's
    // lease, and the server stopped before it activated B.
    SyncServer server(dir.path());
    const std::uint64_t epoch = server.acquireLease("A");
    auto full = testCheckpoint(1, epoch);
    auto final = testCheckpoint(2, epoch, wire::CheckpointKind::FINAL);
    server.push("A", full->getRoot<wire::Checkpoint>().asReader());
    server.push("A", final->getRoot<wire::Checkpoint>().asReader());
    server.releaseLease("A", epoch);
  }
  nlohmann::json state = nlohmann::json::parse(std::ifstream(dir.path() + "/state.json"));
  state["resume_on"] = "B";
  std::ofstream(dir.path() + "/state.json") << state.dump();

  SyncServer server(dir.path());
  ASSERT_TRUE(server.parked());
  auto c = kj::heap<Resumable>();
  Resumable& cPeer = *c;
  auto b = kj::heap<Resumable>();
  Resumable& bPeer = *b;
  // Another device coming back changes nothing.
  server.registerDevice("C", kj::mv(c), 0, 0, false).wait(waitScope);
  loop.run();
  EXPECT_EQ(cPeer.activatedEpoch, 0u);
  EXPECT_TRUE(server.parked());
  // B does: it is caught up and the VM resumes there.
  server.registerDevice("B", kj::mv(b), 0, 0, false).wait(waitScope);
  loop.run();
  EXPECT_EQ(bPeer.applied, 2u);
  EXPECT_GT(bPeer.activatedEpoch, 0u) << "the VM was not resumed on B";
  EXPECT_FALSE(server.parked());
  EXPECT_EQ(cPeer.activatedEpoch, 0u);
}


/// A data directory as a power cut leaves it when it came during a switch
/// from A to B: A's final checkpoint stored, the state still saying that A
/// holds the lease and that A was asked to pause for the switch.
void finalStoredButNotRecorded(const std::string& dir, bool leaseGivenBack = false) {
  std::uint64_t epoch = 0;
  {
    SyncServer server(dir);
    epoch = server.acquireLease("A");
    auto full = testCheckpoint(1, epoch);
    auto final = testCheckpoint(2, epoch, wire::CheckpointKind::FINAL);
    server.push("A", full->getRoot<wire::Checkpoint>().asReader());
    server.push("A", final->getRoot<wire::Checkpoint>().asReader());
    if (leaseGivenBack) server.releaseLease("A", epoch);
  }
  nlohmann::json state = nlohmann::json::parse(std::ifstream(dir + "/state.json"));
  ASSERT_EQ(state["holder"], leaseGivenBack ? "" : "A");
  ASSERT_EQ(state["resume_on"], "");
  state["pause_intent"] = "switch:B";
  std::ofstream(dir + "/state.json") << state.dump();
}

/// `rounds` times: more than the tests' 50 ms lease timeout of real time
/// (the server's clock), a second of the server's timer, and the loop run.
void letTheLeaseTimeoutPass(kj::TimerImpl& timer, kj::EventLoop& loop, int rounds) {
  for (int i = 0; i < rounds; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(60));
    timer.advanceTo(timer.now() + 1 * kj::SECONDS);
    loop.run();
  }
}

TEST(ServerLease, AVmParkedByASwitchTheServerDidNotRecordResumesOnTheSwitchsTarget) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  ASSERT_NO_FATAL_FAILURE(finalStoredButNotRecorded(dir.path(), /*leaseGivenBack=*/true));
  SyncServer server(dir.path());
  ASSERT_TRUE(server.parked());
  auto b = kj::heap<Resumable>();
  Resumable& bPeer = *b;
  server.registerDevice("B", kj::mv(b), 0, 0, false).wait(waitScope);
  loop.run();
  EXPECT_EQ(bPeer.applied, 2u);
  EXPECT_GT(bPeer.activatedEpoch, 0u) << "the VM was not resumed on B";
}

TEST(ServerLease, AHolderBackFromAPauseTheServerDidNotRecordThatDoesNotAskForItsLeaseIsParked) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  ASSERT_NO_FATAL_FAILURE(finalStoredButNotRecorded(dir.path()));
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  SyncServer server(dir.path(), {}, &timer);
  server.setLeaseTimeout(std::chrono::milliseconds(50));
  auto b = kj::heap<Resumable>();
  Resumable& bPeer = *b;
  server.registerDevice("B", kj::mv(b), 0, 0, false).wait(waitScope);
  // Until A is back, nothing changes, however long it takes.
  letTheLeaseTimeoutPass(timer, loop, 1);
  EXPECT_FALSE(server.parked()) << "parked before the holder was back";
  EXPECT_EQ(bPeer.activatedEpoch, 0u);
  // A is back and does not ask for its lease: it had let the VM go. Past the
  // lease timeout the VM is parked at A's final checkpoint and resumes on B,
  // the switch's target.
  server.registerDevice("A", kj::heap<Standby>(), 2, 0, false).wait(waitScope);
  letTheLeaseTimeoutPass(timer, loop, 3);
  EXPECT_EQ(bPeer.applied, 2u);
  EXPECT_GT(bPeer.activatedEpoch, 0u) << "the VM was not resumed on B";
}

TEST(ServerLease, AHolderThatResumedAfterAnUnrecordedPauseAsksForItsLeaseAndKeepsTheVm) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  ASSERT_NO_FATAL_FAILURE(finalStoredButNotRecorded(dir.path()));
  kj::TimerImpl timer(kj::origin<kj::TimePoint>());
  SyncServer server(dir.path(), {}, &timer);
  server.setLeaseTimeout(std::chrono::milliseconds(50));
  auto b = kj::heap<Resumable>();
  Resumable& bPeer = *b;
  server.registerDevice("B", kj::mv(b), 0, 0, false).wait(waitScope);
  // A's answer was lost and it resumed the VM: back, it asks for its lease.
  server.registerDevice("A", kj::heap<Standby>(), 2, 0, false).wait(waitScope);
  server.acquireLease("A");
  letTheLeaseTimeoutPass(timer, loop, 3);
  EXPECT_FALSE(server.parked());
  EXPECT_EQ(bPeer.activatedEpoch, 0u) << "B was activated while A runs the VM";
}

}  // namespace
}  // namespace vmsync
