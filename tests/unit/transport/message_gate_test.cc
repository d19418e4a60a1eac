// The gate measures each incoming message from its segment table, however the
// bytes are split into reads, and refuses one over the limit before the RPC
// layer could allocate room for it.
#include "transport/message_gate.h"

#include <gtest/gtest.h>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <vector>

#include "vmsync.capnp.h"

namespace vmsync {
namespace {

/// A framed checkpoint message with `bytes` of data, in one segment or in
/// several, as the RPC layer sends it.
std::vector<kj::byte> framed(std::size_t bytes, bool manySegments = false) {
  // Small fixed segments force the builder to allocate more of them.
  capnp::MallocMessageBuilder message(manySegments ? 8 : static_cast<unsigned>(bytes / 8 + 1024),
                                      capnp::AllocationStrategy::FIXED_SIZE);
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  checkpoint.setVmId("vm");
  auto chunks = checkpoint.initMemory(manySegments ? 8 : 1);
  for (auto chunk : chunks) chunk.initData(bytes / chunks.size());
  auto words = capnp::messageToFlatArray(message);
  auto chars = words.asBytes();
  return {chars.begin(), chars.end()};
}

struct Recorder {
  std::vector<std::string> violations;
  std::function<void(const std::string&)> hook() {
    return [this](const std::string& why) { violations.push_back(why); };
  }
};

/// Feeds `bytes` to `gate` in reads of `step` bytes; the first refusal.
std::string feed(ConnectionGate& gate, const std::vector<kj::byte>& bytes, std::size_t step) {
  for (std::size_t at = 0; at < bytes.size(); at += step) {
    std::string why = gate.take(bytes.data() + at, std::min(step, bytes.size() - at));
    if (!why.empty()) return why;
  }
  return {};
}

TEST(MessageGate, SmallMessagesPassBeforeAuthorizationHoweverTheyAreSplit) {
  for (std::size_t step : {1, 3, 8, 13, 4096}) {
    Recorder recorder;
    ConnectionGate gate(MessageLimits{}, "alice", std::make_shared<InFlightByUser>(), recorder.hook());
    auto one = framed(1000), two = framed(20000, /*manySegments=*/true);
    ASSERT_GE(two[0], 2) << "several segments, so that the table has padding or not";
    std::vector<kj::byte> stream(one);
    stream.insert(stream.end(), two.begin(), two.end());
    stream.insert(stream.end(), one.begin(), one.end());
    EXPECT_EQ(feed(gate, stream, step), "") << "reads of " << step << " bytes";
    EXPECT_TRUE(recorder.violations.empty());
  }
}

TEST(MessageGate, ALargeMessageBeforeAuthorizationIsRefusedAtItsHeader) {
  Recorder recorder;
  ConnectionGate gate(MessageLimits{}, "mallory", std::make_shared<InFlightByUser>(), recorder.hook());
  auto large = framed(100 << 10);
  ASSERT_EQ(large[0], 0) << "one segment";
  // Only the segment table: the refusal comes before any of the body.
  const std::size_t table = 8;
  std::string why = feed(gate, std::vector<kj::byte>(large.begin(), large.begin() + table), 1);
  EXPECT_NE(why.find("before the connection was authorized"), std::string::npos) << why;
  ASSERT_EQ(recorder.violations.size(), 1u);
  // Once broken, the connection stays refused.
  EXPECT_NE(gate.take(large.data(), 8), "");
  EXPECT_EQ(recorder.violations.size(), 1u);
}

TEST(MessageGate, AuthorizationLiftsTheLimitToThePerMessageOne) {
  Recorder recorder;
  MessageLimits limits;
  limits.perMessage = 1 << 20;
  ConnectionGate gate(limits, "alice", std::make_shared<InFlightByUser>(), recorder.hook());
  gate.authorize();
  EXPECT_EQ(feed(gate, framed(512 << 10), 4096), "");
  std::string why = feed(gate, framed(2 << 20), 4096);
  EXPECT_NE(why.find("the limit is 1.0 MiB"), std::string::npos) << why;
}

TEST(MessageGate, AUsersConnectionsShareOneBudgetOfBytesUnderWay) {
  auto inFlight = std::make_shared<InFlightByUser>();
  MessageLimits limits;
  limits.perUser = 1 << 20;
  Recorder a, b, c;
  auto first = std::make_unique<ConnectionGate>(limits, "alice", inFlight, a.hook());
  ConnectionGate second(limits, "alice", inFlight, b.hook());
  ConnectionGate other(limits, "bob", inFlight, c.hook());
  first->authorize();
  second.authorize();
  other.authorize();
  auto message = framed(700 << 10);
  // The first connection is half way through its message: its bytes are under way.
  EXPECT_EQ(first->take(message.data(), message.size() / 2), "");
  EXPECT_GE((*inFlight)["alice"], message.size());
  std::string why = feed(second, message, 4096);
  EXPECT_NE(why.find("already receiving"), std::string::npos) << why;
  // Another user's budget is its own.
  EXPECT_EQ(feed(other, message, 4096), "");
  // A finished message, or a closed connection, gives its bytes back.
  EXPECT_EQ(first->take(message.data() + message.size() / 2, message.size() - message.size() / 2), "");
  EXPECT_EQ(inFlight->count("alice"), 0u);
  EXPECT_EQ(first->take(message.data(), 100), "");
  EXPECT_EQ(inFlight->at("alice"), message.size());
  first.reset();
  EXPECT_EQ(inFlight->count("alice"), 0u);
}

TEST(MessageGate, MoreSegmentsThanCapnProtoAllowsAreRefused) {
  Recorder recorder;
  ConnectionGate gate(MessageLimits{}, "mallory", std::make_shared<InFlightByUser>(), recorder.hook());
  const kj::byte header[4] = {0xff, 0xff, 0, 0};  // 65536 segments
  std::string why = gate.take(header, sizeof header);
  EXPECT_NE(why.find("65536 segments"), std::string::npos) << why;
}

}  // namespace
}  // namespace vmsync

namespace vmsync {
namespace {

TEST(ServerBudget, TakesInOrderAndLetsWaitersInAsRoomIsGiven) {
  kj::EventLoop loop;
  kj::WaitScope scope(loop);
  ServerBudget budget(100);
  EXPECT_TRUE(budget.tryTake(60));
  auto second = budget.take(50);  // does not fit: waits
  EXPECT_FALSE(second.poll(scope));
  EXPECT_FALSE(budget.tryTake(10)) << "it fits, but someone waits before it";
  auto dropped = budget.take(30);
  auto third = budget.take(20);
  dropped = kj::Promise<void>(kj::NEVER_DONE);  // its connection went away
  budget.give(60);
  EXPECT_TRUE(second.poll(scope));
  EXPECT_TRUE(third.poll(scope));
  EXPECT_EQ(budget.used(), 70u) << "the dropped waiter took nothing";
  budget.give(70);
  // Larger than the whole budget: let in when nothing else is held.
  EXPECT_TRUE(budget.tryTake(500));
  auto small = budget.take(1);
  EXPECT_FALSE(small.poll(scope));
  budget.give(500);
  EXPECT_TRUE(small.poll(scope));
}

/// The bytes of `stream`'s next `size` bytes, read through a gated stream
/// until `reader` has them; resolves then.
kj::Promise<void> readAll(kj::AsyncIoStream& stream, std::vector<kj::byte>& into, std::size_t size) {
  into.resize(size);
  return stream.read(into.data(), 8).then([&stream, &into, size] {
    return stream.read(into.data() + 8, size - 8);
  });
}

TEST(ServerBudget, AConnectionWhoseMessageHasNoRoomIsNotReadUntilAnothersIsIn) {
  kj::EventLoop loop;
  kj::WaitScope scope(loop);
  auto budget = std::make_shared<ServerBudget>(100 << 10);
  auto inFlight = std::make_shared<InFlightByUser>();
  Recorder recorder;
  auto gateA = std::make_shared<ConnectionGate>(MessageLimits{}, "alice", inFlight, recorder.hook(), budget);
  auto gateB = std::make_shared<ConnectionGate>(MessageLimits{}, "bob", inFlight, recorder.hook(), budget);
  gateA->authorize();
  gateB->authorize();
  auto pipeA = kj::newTwoWayPipe(), pipeB = kj::newTwoWayPipe();
  auto streamA = gatedStream(kj::mv(pipeA.ends[0]), gateA);
  auto streamB = gatedStream(kj::mv(pipeB.ends[0]), gateB);
  const auto messageA = framed(80 << 10), messageB = framed(50 << 10);
  // A's header is read: 80 KiB of room taken. Its body has not come yet.
  auto sendA = pipeA.ends[1]->write(messageA.data(), 8).eagerlyEvaluate(nullptr);
  std::vector<kj::byte> headerA(8);
  streamA->read(headerA.data(), 8).wait(scope);
  EXPECT_EQ(budget->used(), messageA.size());
  // B's header does not fit in what is left: its read waits.
  auto sendB = pipeB.ends[1]->write(messageB.data(), messageB.size()).eagerlyEvaluate(nullptr);
  std::vector<kj::byte> gotB;
  auto readB = readAll(*streamB, gotB, messageB.size()).eagerlyEvaluate(nullptr);
  loop.run();
  EXPECT_FALSE(readB.poll(scope)) << "B's message was read with no room for it";
  EXPECT_EQ(gateB->waitingFor(), messageB.size());
  // A's body arrives: its room is given back, and B's message is read whole.
  auto restA = pipeA.ends[1]->write(messageA.data() + 8, messageA.size() - 8).eagerlyEvaluate(nullptr);
  std::vector<kj::byte> bodyA(messageA.size() - 8);
  streamA->read(bodyA.data(), bodyA.size()).wait(scope);
  readB.wait(scope);
  EXPECT_EQ(gotB, messageB);
  EXPECT_EQ(budget->used(), 0u);
  EXPECT_TRUE(recorder.violations.empty()) << "waiting is not a violation";
}

}  // namespace
}  // namespace vmsync
