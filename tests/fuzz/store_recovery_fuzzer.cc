// A server data directory made of the input's files (state.json and
// checkpoint records under any of the names the store looks for), opened by
// the real CheckpointStore and SyncServer: the store either opens, and then
// every checkpoint it says is stored reads back whole or fails with an Error,
// or it refuses the directory with an Error. Whatever it repaired at the first
// open (a damaged head set aside when asked, temporaries), a second open
// accepts, at the same head.
// Regression seeds: corpus/store_recovery/regression-*.
// Also the record reader on the input itself as a file.
//
// Input: sections split by kSectionMark. The first is state.json (absent
// when empty); each further one is a file of the chain whose first byte says
// how it is named and framed (see Selector), the rest its content.
#include <capnp/message.h>
#include <kj/async.h>

#include <array>
#include <spdlog/spdlog.h>

#include <cstdint>
#include <set>
#include <string>

#include "base/error.h"
#include "checkpoint/checkpoint_record.h"
#include "checkpoint_store.h"
#include "fuzz_files.h"
#include "sync_server.h"

namespace {

/// Sequences a file may have: a short chain, gaps, and the far end of the range.
constexpr std::array<std::uint64_t, 16> kSequences = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 100, 1000000,
                                                      (1ull << 63), ~0ull - 1, ~0ull};

/// First byte of a file section.
struct Selector {
  std::uint64_t sequence;  // bits 0-3: index in kSequences
  int suffix;              // bits 4-5: .ckpt, .base, .ckpt.tmp, .ckpt.damaged
  bool raw;                // bit 6: the content as it is, no record header
  bool damaged;            // bit 7: a record whose checksum does not match
  explicit Selector(std::uint8_t b)
      : sequence(kSequences[b & 15]), suffix((b >> 4) & 3), raw(b & 0x40), damaged(b & 0x80) {}
  std::string name() const {
    static constexpr const char* kSuffixes[] = {".ckpt", ".base", ".ckpt.tmp", ".ckpt.damaged"};
    return fmt::format("{:020}{}", sequence, kSuffixes[suffix]);
  }
};

/// Reads every stored checkpoint. The store verified each at open: a read
/// returns a sound message (every pointer in it within it) or fails with an
/// Error. What the fields then say is checked where they are used, as for a
/// message from the network: a field of the wrong kind may raise a
/// kj::Exception there, never worse.
void readAll(const vmsync::CheckpointStore& store, const std::set<std::uint64_t>& candidates) {
  for (std::uint64_t s : candidates) {
    if (!store.stored(s)) continue;
    kj::Own<vmsync::StoredCheckpoint> checkpoint;
    try {
      checkpoint = store.read(s);
    } catch (const vmsync::Error&) {
      continue;
    }
    auto reader = checkpoint->reader();
    (void)reader.totalSize();  // a kj::Exception here escapes: a crash
    try {
      (void)reader.getKind();
      for (auto chunk : reader.getMemory()) (void)chunk.getData();
      for (auto chunk : reader.getDisk()) (void)chunk.getData();
    } catch (const kj::Exception&) {
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // the refusals are expected; logging them only costs time
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static vmsync::fuzz::ScratchDir scratch("store");
  scratch.clear();
  const std::string& dir = scratch.path();

  // The record reader on the input as one file.
  vmsync::fuzz::writeFile(dir + "/input.record", {reinterpret_cast<const char*>(data), size});
  std::string why;
  if (vmsync::readRecordFile(dir + "/input.record", why) == nullptr && why.empty()) __builtin_trap();
  std::filesystem::remove(dir + "/input.record");

  const auto sections = vmsync::fuzz::splitSections(data, size, 9);
  if (!sections[0].empty()) vmsync::fuzz::writeFile(dir + "/state.json", sections[0]);
  std::filesystem::create_directories(dir + "/checkpoints");
  std::set<std::uint64_t> sequences;
  for (std::size_t i = 1; i < sections.size(); ++i) {
    if (sections[i].empty()) continue;
    Selector selector(static_cast<std::uint8_t>(sections[i][0]));
    const std::string path = dir + "/checkpoints/" + selector.name();
    const std::string_view content = sections[i].substr(1);
    if (selector.raw) vmsync::fuzz::writeFile(path, content);
    else vmsync::fuzz::writeRecord(path, content, selector.damaged);
    sequences.insert(selector.sequence);
  }

  // Opened as the server opens it, or refused with a reason; refused, then
  // opened as an operator who sets a damaged head aside would.
  std::uint64_t head = 0;
  bool opened = false;
  for (bool setAside : {false, true}) {
    try {
      vmsync::CheckpointStore store(dir, vmsync::StoreRecovery{.setAsideDamagedHead = setAside});
      head = store.head();
      if (store.base() > head || (store.base() == 0) != (head == 0)) __builtin_trap();
      readAll(store, sequences);
      opened = true;
      break;
    } catch (const vmsync::Error&) {
    }
  }
  if (!opened) return 0;
  // What the first open left is a directory the server opens, at the same head.
  kj::EventLoop loop;
  kj::WaitScope scope(loop);
  vmsync::SyncServer server(dir, vmsync::CompactionLimits{0, 0});
  if (server.head() != head) __builtin_trap();
  capnp::MallocMessageBuilder message;
  server.fillStatus(message.initRoot<vmsync::wire::ClusterStatus>());
  return 0;
}
