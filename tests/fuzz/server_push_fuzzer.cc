// A checkpoint message from the input, pushed to a real SyncServer (with a
// data directory, a registered device holding the lease, and a full
// checkpoint stored): the server rejects it with an Error or stores it whole;
// it never crashes, and a rejected push changes nothing.
#include <capnp/serialize.h>
#include <kj/async.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <vector>

#include "checkpoint_merge.h"
#include "base/error.h"
#include "checkpoint_mutator.h"
#include "fuzz_input.h"
#include "sync_server.h"
#include "base/units.h"

namespace {

constexpr std::uint64_t kMemoryUnits = 16, kDiskUnits = 8;

struct Server {
  std::string dir;
  kj::EventLoop loop;
  kj::WaitScope scope{loop};
  std::unique_ptr<vmsync::SyncServer> server;
  std::uint64_t epoch = 0;

  Server() {
    char tmpl[] = "/tmp/vmsync-fuzz-server-XXXXXX";
    dir = ::mkdtemp(tmpl);
    // No compaction: every accepted push stays readable for the merge below.
    server = std::make_unique<vmsync::SyncServer>(dir, vmsync::CompactionLimits{0, 0});
    server->registerDevice("phone", capnp::Capability::Client(nullptr).castAs<vmsync::wire::DevicePeer>(), 0);
    epoch = server->acquireLease("phone");
    capnp::MallocMessageBuilder message;
    auto full = message.initRoot<vmsync::wire::Checkpoint>();
    full.setVmId("vm");
    full.setEpoch(epoch);
    full.setSequence(1);
    full.setKind(vmsync::wire::CheckpointKind::FULL);
    auto spec = full.initSpec();
    spec.setVmId("vm");
    spec.setMemoryBytes(kMemoryUnits * vmsync::kUnitSize);
    spec.setDiskBytes(kDiskUnits * vmsync::kUnitSize);
    full.initMemory(1)[0].setEncoding(vmsync::wire::ChunkEncoding::ZERO);
    server->push("phone", full.asReader());
  }
  ~Server() {
    server.reset();
    std::filesystem::remove_all(dir);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Server s;
  if (size < 8) return 0;
  std::vector<capnp::word> words = vmsync::fuzz::inputWords(data, size);
  const capnp::ReaderOptions limits = vmsync::fuzz::inputLimits();
  const std::uint64_t head = s.server->head();
  try {
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(words.data(), words.size()), limits);
    auto checkpoint = reader.getRoot<vmsync::wire::Checkpoint>();
    s.server->push("phone", checkpoint);
    if (s.server->head() != head + 1) __builtin_trap();
    // Stored: it must merge with the checkpoint before it, as a catch-up would.
    capnp::MallocMessageBuilder merged;
    vmsync::mergeCheckpoints({checkpoint}, merged.initRoot<vmsync::wire::Checkpoint>());
  } catch (const vmsync::Error&) {
    if (s.server->head() != head) __builtin_trap();  // rejected: nothing stored
  } catch (const kj::Exception&) {
    if (s.server->head() != head) __builtin_trap();
  }
  s.scope.poll();
  return 0;
}

// Mutants as Checkpoint messages (see checkpoint_mutator.h).
extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size, std::size_t maxSize,
                                               unsigned int seed) {
  return vmsync::fuzz::mutateCheckpointInput(data, size, maxSize, seed);
}
