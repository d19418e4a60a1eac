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

#include <string>

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
