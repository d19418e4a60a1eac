// Writes the hand-made seeds of the store_recovery, replica_state and rpc
// targets into a corpus root (one folder per target), in the targets' input
// formats. Run once to start their corpora; `make fuzz-long` grows them.
//   make_seeds CORPUS_ROOT
#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/serialize.h>
#include <kj/async-io.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "base/units.h"
#include "fuzz_files.h"
#include "transport/rpc_util.h"
#include "vmsync.capnp.h"

namespace {

using vmsync::wire::Checkpoint;
using vmsync::wire::CheckpointKind;
using vmsync::wire::ChunkEncoding;

std::string flat(capnp::MessageBuilder& message) {
  auto words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

/// A small checkpoint of VM "vm" (16 RAM units, 8 disk units).
std::string checkpoint(std::uint64_t sequence, CheckpointKind kind,
                       vmsync::wire::Policy policy = vmsync::wire::Policy::DIRTY_PREV) {
  capnp::MallocMessageBuilder message;
  auto c = message.initRoot<Checkpoint>();
  c.setVmId("vm");
  c.setEpoch(1);
  c.setSequence(sequence);
  c.setBaseSequence(kind == CheckpointKind::FULL ? 0 : sequence - 1);
  c.setKind(kind);
  c.setPolicy(policy);
  c.setOrigin("phone");
  if (kind == CheckpointKind::FULL) {
    auto spec = c.initSpec();
    spec.setVmId("vm");
    spec.setMemoryBytes(16 * vmsync::kUnitSize);
    spec.setDiskBytes(8 * vmsync::kUnitSize);
    spec.setPolicy(policy);
    spec.setVcpus(1);
  }
  auto memory = c.initMemory(3);
  memory[0].setIndex(sequence % 16);
  memory[0].setEncoding(ChunkEncoding::ZERO);
  memory[1].setIndex(5);
  memory[1].setEncoding(ChunkEncoding::XOR_DIFF);
  const kj::byte run[] = {0, 4, 1, 2, 3, 4};  // unchanged 0, changed 4, the 4 new bytes
  memory[1].setData(kj::arrayPtr(run, sizeof run));
  memory[1].setRawSize(sizeof run);
  memory[2].setIndex(6);
  memory[2].setEncoding(ChunkEncoding::SAME_AS);
  memory[2].setSameAs(0);
  const bool full = kind == CheckpointKind::FULL;
  auto disk = c.initDisk(full ? 1 : 2);
  disk[0].setIndex(1);
  disk[0].setEncoding(ChunkEncoding::ZERO);
  if (!full) {  // block 2 takes block 3's bytes, if they hash as named
    disk[1].setIndex(2);
    disk[1].setEncoding(ChunkEncoding::REFERENCE);
    const kj::byte reference[16] = {3, 0, 0, 0, 0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88};
    disk[1].setData(kj::arrayPtr(reference, sizeof reference));
    disk[1].setRawSize(sizeof reference);
  }
  if (kind == CheckpointKind::FINAL) {
    const kj::byte state[] = {'Q', 'E', 'V', 'M'};
    c.setDeviceState(kj::arrayPtr(state, sizeof state));
    c.initImageDigest(32);
  }
  return flat(message);
}

std::string sections(const std::vector<std::string>& parts) {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (i) out += vmsync::fuzz::kSectionMark;
    out += parts[i];
  }
  return out;
}

/// A store_recovery file section: selector byte (sequence index, suffix, raw, damaged), then content.
std::string file(int sequenceIndex, int suffix, bool raw, bool damaged, const std::string& content) {
  const char selector = static_cast<char>(sequenceIndex | suffix << 4 | (raw ? 0x40 : 0) | (damaged ? 0x80 : 0));
  return std::string(1, selector) + content;
}

void write(const std::string& dir, const std::string& name, const std::string& bytes) {
  std::filesystem::create_directories(dir);
  vmsync::fuzz::writeFile(dir + "/" + name, bytes);
}

void storeSeeds(const std::string& dir) {
  const std::string state =
      R"({"vm_id":"vm","epoch":1,"holder":"phone","owner":"","abandoned_after":0,"abandoned_up_to":0,)"
      R"("abandoned_total":0,"failovers":[[1,1]],"devices":{"phone":3,"tablet":1}})";
  const std::string full = checkpoint(1, CheckpointKind::FULL);
  write(dir, "chain", sections({state, file(0, 0, false, false, full),
                                file(1, 0, false, false, checkpoint(2, CheckpointKind::INCREMENTAL)),
                                file(2, 0, false, false, checkpoint(3, CheckpointKind::FINAL))}));
  write(dir, "torn-tail", sections({state, file(0, 0, false, false, full),
                                    file(1, 0, false, false, checkpoint(2, CheckpointKind::INCREMENTAL)),
                                    file(2, 0, true, false, checkpoint(3, CheckpointKind::INCREMENTAL).substr(0, 40))}));
  write(dir, "folded", sections({"", file(1, 1, false, false, full), file(0, 0, false, false, full),
                                 file(2, 0, false, false, checkpoint(3, CheckpointKind::INCREMENTAL)),
                                 file(3, 2, true, false, "left by a crash")}));
  write(dir, "orig-gap", sections({state, file(0, 0, false, false, checkpoint(1, CheckpointKind::FULL,
                                                                               vmsync::wire::Policy::DIFF_ORIG)),
                                   file(4, 0, false, false, checkpoint(5, CheckpointKind::INCREMENTAL,
                                                                       vmsync::wire::Policy::DIFF_ORIG))}));
  write(dir, "damaged-middle", sections({"", file(0, 0, false, false, full),
                                         file(1, 0, false, true, checkpoint(2, CheckpointKind::INCREMENTAL)),
                                         file(2, 0, false, false, checkpoint(3, CheckpointKind::INCREMENTAL))}));
}

void replicaSeeds(const std::string& dir) {
  const std::string spec =
      R"({"vm_id":"vm","memory_bytes":65536,"disk_bytes":32768,"cmdline":"console=ttyS0","accel":"tcg",)"
      R"("cpu_model":"qemu64","vcpus":1,"policy":"dirty-prev"})";
  write(dir, "applied", sections({std::string(1, '\0'), spec, "1 1", "", ""}));
  write(dir, "journal", sections({std::string(1, '\0'), spec, "1 1", "",
                                  checkpoint(2, CheckpointKind::INCREMENTAL)}));
  write(dir, "journal-full", sections({std::string(1, '\0'), "", "", "", checkpoint(1, CheckpointKind::FULL)}));
  write(dir, "journal-final", sections({std::string(1, '\x01'), spec, "2 1", "2",
                                        checkpoint(3, CheckpointKind::FINAL)}));
  write(dir, "torn-journal", sections({std::string(1, '\x08'), spec, "1", "",
                                       checkpoint(2, CheckpointKind::INCREMENTAL)}));
  const std::string orig =
      R"({"vm_id":"vm","memory_bytes":65536,"disk_bytes":32768,"cmdline":"","accel":"kvm",)"
      R"("cpu_model":"host","vcpus":2,"policy":"diff-orig"})";
  write(dir, "orig-base", sections({std::string(1, '\x12'), orig, "4 2", "4",
                                    checkpoint(6, CheckpointKind::INCREMENTAL, vmsync::wire::Policy::DIFF_ORIG)}));
}

/// A DevicePeer that answers nothing: the seeds only need its capability.
class SilentPeer final : public vmsync::wire::DevicePeer::Server {};

/// The messages a real client sends for `calls`, each as one rpc seed section.
template <typename Calls>
std::string rpcTraffic(kj::AsyncIoContext& io, Calls&& calls) {
  auto pipe = io.provider->newTwoWayPipe();
  auto captured = pipe.ends[1]->readAllBytes().eagerlyEvaluate(nullptr);
  {
    vmsync::RpcConnection client(kj::mv(pipe.ends[0]), capnp::rpc::twoparty::Side::CLIENT,
                                 capnp::Capability::Client(nullptr));
    auto server = client.bootstrap().castAs<vmsync::wire::SyncServer>();
    std::vector<kj::Promise<void>> pending;
    calls(server, pending);
    for (int i = 0; i < 100; ++i) io.waitScope.poll();
  }
  auto bytes = captured.wait(io.waitScope);
  // Cut the stream into its messages; every one must fit one segment, as
  // the target frames them.
  kj::ArrayInputStream in(bytes);
  std::vector<std::string> messages;
  while (in.tryGetReadBuffer().size() != 0) {
    capnp::InputStreamMessageReader reader(in);
    auto segment = reader.getSegment(0);
    if (reader.getSegment(1) != nullptr) {
      std::fprintf(stderr, "make_seeds: a message of more than one segment\n");
      std::exit(1);
    }
    auto segmentBytes = segment.asBytes();
    messages.emplace_back(reinterpret_cast<const char*>(segmentBytes.begin()), segmentBytes.size());
  }
  return sections(messages);
}

void rpcSeeds(const std::string& dir) {
  auto io = kj::setupAsyncIo();
  using Server = vmsync::wire::SyncServer::Client;
  using Pending = std::vector<kj::Promise<void>>;
  auto keep = [](auto promise, Pending& pending) {
    pending.push_back(promise.ignoreResult().eagerlyEvaluate([](kj::Exception&&) {}));
  };
  write(dir, "status", rpcTraffic(io, [&](Server server, Pending& pending) {
          keep(server.statusRequest().send(), pending);
        }));
  write(dir, "register-push", rpcTraffic(io, [&](Server server, Pending& pending) {
          auto reg = server.registerRequest();
          reg.setDeviceId("phone");
          reg.setPeer(kj::heap<SilentPeer>());
          reg.setAppliedSequence(1);
          reg.setAppliedEpoch(1);
          auto session = reg.send().getSession();
          keep(session.renewLeaseRequest().send(), pending);
          auto push = session.pushRequest();
          const std::string words = checkpoint(2, CheckpointKind::INCREMENTAL);
          capnp::FlatArrayMessageReader reader(kj::arrayPtr(reinterpret_cast<const capnp::word*>(words.data()),
                                                            words.size() / sizeof(capnp::word)));
          push.setCheckpoint(reader.getRoot<Checkpoint>());
          push.getCheckpoint().setEpoch(1);
          keep(push.send(), pending);
        }));
  write(dir, "register-switch", rpcTraffic(io, [&](Server server, Pending& pending) {
          auto reg = server.registerRequest();
          reg.setDeviceId("tablet");
          reg.setPeer(kj::heap<SilentPeer>());
          keep(reg.send(), pending);
          auto to = server.switchToRequest();
          to.setTarget("tablet");
          keep(to.send(), pending);
        }));
  write(dir, "lease-stop", rpcTraffic(io, [&](Server server, Pending& pending) {
          auto reg = server.registerRequest();
          reg.setDeviceId("phone");
          reg.setPeer(kj::heap<SilentPeer>());
          reg.setAppliedSequence(1);
          auto session = reg.send().getSession();
          keep(session.acquireLeaseRequest().send(), pending);
          auto release = session.releaseLeaseRequest();
          release.setEpoch(1);
          keep(release.send(), pending);
          keep(server.stopRequest().send(), pending);
        }));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds CORPUS_ROOT\n");
    return 2;
  }
  const std::string root = argv[1];
  storeSeeds(root + "/store_recovery");
  replicaSeeds(root + "/replica_state");
  rpcSeeds(root + "/rpc");
  return 0;
}
