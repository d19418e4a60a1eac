// The lease while a switch runs: the holder that asks for it again (back
// from a cut connection) keeps it until its final checkpoint is stored;
// any other device is refused until the switch is over.
#include <capnp/message.h>
#include <gtest/gtest.h>
#include <kj/async.h>

#include "base/error.h"
#include "sync_server.h"
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

}  // namespace
}  // namespace vmsync
