// Server fan-out: one checkpoint pushed by the active device reaches 8
// standbys through a real SyncServer over loopback RPC (all in one event
// loop, so the time includes every side's CPU on this thread).
#include <benchmark/benchmark.h>
#include <kj/async-io.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "checkpoint/chunk_codec.h"
#include "transport/secure_channel.h"
#include "sync_server.h"
#include "base/units.h"

namespace vmsync {
namespace {

constexpr std::uint64_t kMemoryUnits = 1 << 16;  // 256 MiB guest RAM
constexpr unsigned kStandbys = 8;

// The server says at info level who comes and goes; the table needs no such lines.
const bool kQuiet = [] {
  spdlog::set_level(spdlog::level::warn);
  return true;
}();

/// A standby that acknowledges every checkpoint at once.
class CountingPeer final : public wire::DevicePeer::Server {
 public:
  CountingPeer(std::uint64_t& applied, kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>>& wake, unsigned& waiting)
      : applied_(applied), wake_(wake), waiting_(waiting) {}
  kj::Promise<void> apply(ApplyContext context) override {
    auto checkpoint = context.getParams().getCheckpoint();
    applied_ = checkpoint.getSequence();
    context.getResults().setAppliedSequence(applied_);
    if (waiting_ > 0 && --waiting_ == 0) KJ_IF_MAYBE(f, wake_) { (*f)->fulfill(); }
    return kj::READY_NOW;
  }
  kj::Promise<void> handOff(HandOffContext) override { KJ_FAIL_REQUIRE("not in this benchmark"); }
  kj::Promise<void> activate(ActivateContext) override { KJ_FAIL_REQUIRE("not in this benchmark"); }

 private:
  std::uint64_t& applied_;
  kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>>& wake_;
  unsigned& waiting_;
};

void BM_ServerFanOutTo8Standbys(benchmark::State& state) {
  const auto pages = static_cast<unsigned>(state.range(0));
  char tmpl[] = "/tmp/vmsync-fanout-XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  {
    auto io = kj::setupAsyncIo();
    SyncServer server(dir, CompactionLimits{0, 0});
    ServerTransport transport;
    auto listener = io.provider->getNetwork().parseAddress("127.0.0.1:0").wait(io.waitScope)->listen();
    const std::string address = "127.0.0.1:" + std::to_string(listener->getPort());
    auto serving = transport.serve(*listener, [&server](const PeerIdentity& peer, std::shared_ptr<ConnectionGate> gate)
                                                  -> capnp::Capability::Client {
      return server.client(peer, gate);
    }).eagerlyEvaluate([](kj::Exception&&) {});
    ClientTransport client;

    std::vector<std::uint64_t> applied(kStandbys);
    kj::Maybe<kj::Own<kj::PromiseFulfiller<void>>> wake;
    unsigned waiting = 0;
    std::vector<kj::Own<RpcConnection>> connections;
    std::vector<wire::DeviceSession::Client> sessions;
    auto join = [&](const std::string& id, wire::DevicePeer::Client peer) {
      connections.push_back(client.connect(io, address).wait(io.waitScope));
      auto request = connections.back()->bootstrap().castAs<wire::SyncServer>().registerRequest();
      request.setDeviceId(id);
      request.setPeer(kj::mv(peer));
      sessions.push_back(request.send().wait(io.waitScope).getSession());
    };
    join("active", kj::heap<CountingPeer>(applied[0], wake, waiting));
    for (unsigned i = 0; i < kStandbys; ++i) join("standby" + std::to_string(i), kj::heap<CountingPeer>(applied[i], wake, waiting));
    auto& active = sessions.front();
    const std::uint64_t epoch = active.acquireLeaseRequest().send().wait(io.waitScope).getEpoch();

    std::mt19937 rng(1);
    std::vector<std::byte> page(kUnitSize);
    std::uint64_t sequence = 0;
    auto pushAndWait = [&](bool full) {
      auto request = active.pushRequest();
      auto c = request.initCheckpoint();
      c.setVmId("vm");
      c.setEpoch(epoch);
      c.setSequence(++sequence);
      c.setBaseSequence(sequence - 1);
      c.setKind(full ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
      if (full) {
        auto spec = c.initSpec();
        spec.setVmId("vm");
        spec.setMemoryBytes(kMemoryUnits * kUnitSize);
        spec.setDiskBytes(16 * kUnitSize);
      }
      auto chunks = c.initMemory(full ? 1 : pages);
      for (unsigned i = 0; i < chunks.size(); ++i) {
        for (auto& b : page) b = std::byte(rng() & 0xff);
        toWire(encodeWhole((static_cast<std::uint64_t>(rng()) % (kMemoryUnits / pages)) * pages + i, page, false),
               chunks[i]);
      }
      auto paf = kj::newPromiseAndFulfiller<void>();
      wake = kj::mv(paf.fulfiller);
      waiting = kStandbys;
      request.send().wait(io.waitScope);
      paf.promise.wait(io.waitScope);
    };
    pushAndWait(true);
    for (auto _ : state) pushAndWait(false);
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * pages * kUnitSize * kStandbys);
    state.counters["pages"] = pages;
  }
  std::filesystem::remove_all(dir);
}
BENCHMARK(BM_ServerFanOutTo8Standbys)->Arg(256)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace vmsync

BENCHMARK_MAIN();
