// What reading an RPC message may cost follows the message's size: a call
// whose capability table claims millions of empty entries in a few words is
// refused by the reader instead of making the RPC layer allocate for each.
#include "transport/rpc_util.h"

#include <gtest/gtest.h>

#include <capnp/any.h>
#include <capnp/message.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize-async.h>

#include "vmsync.capnp.h"

#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "base/error.h"

namespace vmsync {
namespace {

/// A capability that implements nothing (the test never calls it).
class Nothing final : public wire::DevicePeer::Server {};

TEST(TraversalLimit, FollowsTheMessageSizeBetweenAFloorAndTheCeiling) {
  const std::uint64_t most = kMaxMessageBytes / sizeof(capnp::word);
  EXPECT_EQ(traversalLimitFor(0), kMinTraversalWords);
  EXPECT_EQ(traversalLimitFor(10), kMinTraversalWords);
  EXPECT_EQ(traversalLimitFor(1u << 20), (1u << 20) * kTraversalPerWord);
  EXPECT_EQ(traversalLimitFor(most), most);
  EXPECT_EQ(traversalLimitFor(most / kTraversalPerWord), most);
  EXPECT_EQ(traversalLimitFor(~std::uint64_t{0}), most);  // no overflow
}

TEST(DeadLink, ProbesFitTheTimeout) {
  const DeadLinkProbes standard = deadLinkProbes(kDefaultDeadLinkSeconds);
  EXPECT_EQ(standard.idleSeconds, 5);
  EXPECT_EQ(standard.intervalSeconds, 2);
  EXPECT_EQ(standard.count, 7);  // 5 s idle, then 7 probes 2 s apart: dead at 19-20 s
  EXPECT_EQ(standard.userTimeoutMs, 20000u);
  for (int seconds : {kMinDeadLinkSeconds, 3, 5, 8, 20, 60, 3600}) {
    const DeadLinkProbes p = deadLinkProbes(seconds);
    EXPECT_GE(p.idleSeconds, 1) << seconds;
    EXPECT_GE(p.intervalSeconds, 1) << seconds;
    EXPECT_GE(p.count, 1) << seconds;
    EXPECT_LE(p.count, 127) << seconds;  // Linux's most
    EXPECT_LE(p.idleSeconds + p.count * p.intervalSeconds, seconds) << seconds;  // found dead in time
    EXPECT_GT(p.idleSeconds + (p.count + 1) * p.intervalSeconds, seconds) << seconds;  // and not much sooner
    EXPECT_EQ(p.userTimeoutMs, static_cast<unsigned>(seconds) * 1000u) << seconds;
  }
}

TEST(DeadLink, ASocketTakesTheProcessTimeout) {
  ASSERT_EQ(deadLinkSeconds(), kDefaultDeadLinkSeconds);
  EXPECT_THROW(setDeadLinkSeconds(kMinDeadLinkSeconds - 1), Error);
  EXPECT_EQ(deadLinkSeconds(), kDefaultDeadLinkSeconds);
  setDeadLinkSeconds(5);
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  const bool applied = detectDeadLink([fd](int level, int name, const void* value, unsigned length) {
    return ::setsockopt(fd, level, name, value, length) == 0;
  });
  setDeadLinkSeconds(kDefaultDeadLinkSeconds);
  ASSERT_TRUE(applied);
  auto get = [fd](int level, int name) {
    int value = -1;
    socklen_t length = sizeof value;
    EXPECT_EQ(::getsockopt(fd, level, name, &value, &length), 0) << name;
    return value;
  };
  const DeadLinkProbes expected = deadLinkProbes(5);
  EXPECT_EQ(get(SOL_SOCKET, SO_KEEPALIVE), 1);
  EXPECT_EQ(get(IPPROTO_TCP, TCP_KEEPIDLE), expected.idleSeconds);
  EXPECT_EQ(get(IPPROTO_TCP, TCP_KEEPINTVL), expected.intervalSeconds);
  EXPECT_EQ(get(IPPROTO_TCP, TCP_KEEPCNT), expected.count);
  EXPECT_EQ(get(IPPROTO_TCP, TCP_USER_TIMEOUT), 5000);
  ::close(fd);
}

TEST(RpcConnection, ACapabilityTableOfEmptyEntriesIsRefusedNotAllocated) {
  auto io = kj::setupAsyncIo();
  auto pipe = io.provider->newTwoWayPipe();
  RpcConnection server(kj::mv(pipe.ends[0]), capnp::rpc::twoparty::Side::SERVER,
                       capnp::Capability::Client(kj::heap<Nothing>()));
  kj::AsyncIoStream& client = *pipe.ends[1];

  capnp::MallocMessageBuilder bootstrap;
  bootstrap.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(0);
  capnp::writeMessage(client, bootstrap).wait(io.waitScope);
  // A call on the bootstrap capability whose parameters claim 2^24 capability
  // descriptors of zero words each: the whole message is a few words, and
  // 2^24 words is well within the 2 GiB ceiling.
  capnp::MallocMessageBuilder call;
  auto c = call.initRoot<capnp::rpc::Message>().initCall();
  c.setQuestionId(1);
  c.initTarget().initPromisedAnswer().setQuestionId(0);
  c.setInterfaceId(0x1234);
  c.setMethodId(0);
  auto params = c.initParams();
  capnp::AnyStruct::Builder payload(kj::mv(params));
  payload.getPointerSection()[1].initAsListOfAnyStruct(0, 0, 1u << 24);
  ASSERT_LT(call.sizeInWords(), 64u);
  capnp::writeMessage(client, call).wait(io.waitScope);

  // The server answers the bootstrap, then aborts the connection, saying why.
  std::string abort;
  for (;;) {
    KJ_IF_MAYBE(message, capnp::tryReadMessage(client).wait(io.waitScope)) {
      auto m = (*message)->getRoot<capnp::rpc::Message>();
      if (m.isAbort()) {
        abort = m.getAbort().getReason().cStr();
        break;
      }
      if (m.isReturn() && m.getReturn().getAnswerId() == 1) {
        ADD_FAILURE() << "the call was taken up, with its 2^24 capability descriptors";
        break;
      }
    } else {
      break;  // closed without an abort
    }
  }
  EXPECT_NE(abort.find("traversal limit"), std::string::npos) << "abort: '" << abort << "'";
}

}  // namespace
}  // namespace vmsync
