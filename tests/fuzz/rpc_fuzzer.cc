// The input as Cap'n Proto RPC traffic from a client, sent over a socket
// pair to a real SyncServer (a data directory holding a full checkpoint,
// device "phone" registered with the lease) served by the real RpcConnection:
// whatever the messages say, the server answers, refuses or drops the
// connection, and never crashes, leaks or hangs, and what a message costs it
// to read follows the message's size (see traversalLimitFor). Every message
// goes in as it is, sound or not.
//
// Input: sections split by kSectionMark, each the words of one single-segment
// message (an rpc.capnp Message); the target adds the stream framing (the
// segment table), so mutations reach the RPC layer and the server's calls
// instead of dying in the framing.
#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>
#include <kj/async-io.h>

#include <spdlog/spdlog.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <vector>

#include "base/units.h"
#include "fuzz_files.h"
#include "sync_server.h"
#include "transport/rpc_util.h"

namespace {

constexpr std::size_t kMaxMessages = 8;
/// Event loop turns per input: far more than a well-formed exchange needs; a
/// call still waiting then (a device that never answers) is cancelled.
constexpr int kMaxTurns = 2000;

/// The process's event loop and the data directory every input starts from.
struct Fixture {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  vmsync::fuzz::ScratchDir initial{"rpc-initial"};
  vmsync::fuzz::ScratchDir scratch{"rpc"};

  Fixture() {
    vmsync::SyncServer server(initial.path(), vmsync::CompactionLimits{0, 0});
    server.registerDevice("phone", capnp::Capability::Client(nullptr).castAs<vmsync::wire::DevicePeer>(), 0)
        .wait(io.waitScope);
    const std::uint64_t epoch = server.acquireLease("phone");
    capnp::MallocMessageBuilder message;
    auto full = message.initRoot<vmsync::wire::Checkpoint>();
    full.setVmId("vm");
    full.setEpoch(epoch);
    full.setSequence(1);
    full.setKind(vmsync::wire::CheckpointKind::FULL);
    full.setOrigin("phone");
    auto spec = full.initSpec();
    spec.setVmId("vm");
    spec.setMemoryBytes(16 * vmsync::kUnitSize);
    spec.setDiskBytes(8 * vmsync::kUnitSize);
    full.initMemory(1)[0].setEncoding(vmsync::wire::ChunkEncoding::ZERO);
    server.push("phone", full.asReader());
  }
};

/// Each section framed as a one-segment message of the RPC stream.
kj::Array<capnp::word> frame(const std::vector<std::string_view>& sections) {
  std::vector<std::uint64_t> out;
  for (std::string_view section : sections) {
    const std::uint32_t words = static_cast<std::uint32_t>(section.size() / sizeof(capnp::word));
    const std::uint32_t table[2] = {0, words};  // segment count less one, then the segment's size
    std::uint64_t header;
    std::memcpy(&header, table, sizeof header);
    out.push_back(header);
    const std::size_t at = out.size();
    out.resize(at + words);
    std::memcpy(out.data() + at, section.data(), words * sizeof(capnp::word));
  }
  auto array = kj::heapArray<capnp::word>(out.size());
  if (!out.empty()) std::memcpy(array.begin(), out.data(), out.size() * sizeof(capnp::word));
  return array;
}

/// Reads and drops what the server sends, until it closes its end.
kj::Promise<void> drain(kj::AsyncIoStream& stream, kj::byte* buffer, std::size_t size) {
  return stream.tryRead(buffer, 1, size).then([&stream, buffer, size](std::size_t n) -> kj::Promise<void> {
    if (n == 0) return kj::READY_NOW;
    return drain(stream, buffer, size);
  });
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // the refusals are expected; logging them only costs time
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Fixture fixture;
  auto& scope = fixture.io.waitScope;
  const std::string& dir = fixture.scratch.path();
  fixture.scratch.clear();
  vmsync::fuzz::copyTree(fixture.initial.path(), dir);

  const auto sections = vmsync::fuzz::splitSections(data, size, kMaxMessages);
  const kj::Array<capnp::word> traffic = frame(sections);
  auto server = std::make_unique<vmsync::SyncServer>(dir, vmsync::CompactionLimits{0, 0},
                                                     &fixture.io.provider->getTimer());
  auto pipe = fixture.io.provider->newTwoWayPipe();
  kj::AsyncIoStream& client = *pipe.ends[1];
  {
    auto connection = kj::heap<vmsync::RpcConnection>(kj::mv(pipe.ends[0]), capnp::rpc::twoparty::Side::SERVER,
                                                      server->client());
    auto disconnected = connection->onDisconnect().eagerlyEvaluate(nullptr);
    auto sending = client.write(traffic.begin(), traffic.size() * sizeof(capnp::word))
                       .then([&client]() { client.shutdownWrite(); })
                       .eagerlyEvaluate([](kj::Exception&&) {});
    auto buffer = kj::heapArray<kj::byte>(4096);
    auto receiving = drain(client, buffer.begin(), buffer.size()).eagerlyEvaluate([](kj::Exception&&) {});
    for (int turn = 0; turn < kMaxTurns && !disconnected.poll(scope); ++turn) scope.poll();
    // The connection goes first, cancelling calls still under way, then the
    // client's promises that use its end.
    connection = nullptr;
    scope.poll();
  }
  pipe.ends[1] = nullptr;
  scope.poll();
  server.reset();
  scope.poll();
  return 0;
}
