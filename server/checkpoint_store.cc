#include "checkpoint_store.h"

#include <capnp/serialize.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/checkpoint_record.h"
#include "base/durable_file.h"
#include "base/error.h"
#include "transport/rpc_util.h"

namespace vmsync {

namespace fs = std::filesystem;

StoredCheckpoint::StoredCheckpoint(kj::Array<capnp::word> words)
    : words_(kj::mv(words)), message_(words_.asPtr(), rpcReaderOptions()) {}

namespace {

/// Sequence number in a file name "00000000000000000042.ckpt", or 0.
std::uint64_t sequenceOf(const std::string& name, std::string_view suffix) {
  if (!name.ends_with(suffix) || name.size() != 20 + suffix.size()) return 0;
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < 20; ++i) {
    if (name[i] < '0' || name[i] > '9') return 0;
    value = value * 10 + static_cast<std::uint64_t>(name[i] - '0');
  }
  return value;
}

/// The checkpoint in record file `path`, or nullptr with why not in `why`. The
/// checksum shows the bytes are the ones written; the message must also be
/// well-formed (as every push is checked to be), or a reader of it would fail
/// later, with a kj::Exception, instead of here.
kj::Maybe<kj::Own<StoredCheckpoint>> readCheckpointFile(const std::string& path, std::string& why) {
  KJ_IF_MAYBE(words, readRecordFile(path, why)) {
    kj::Own<StoredCheckpoint> checkpoint;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      checkpoint = kj::refcounted<StoredCheckpoint>(kj::mv(*words));
      (void)checkpoint->reader();
    })) {
      why = fmt::format("it is not a Cap'n Proto message ({})", e->getDescription().cStr());
      return nullptr;
    }
    try {
      checkWellFormed(checkpoint->reader());
    } catch (const Error& e) {
      why = e.what();
      return nullptr;
    }
    return kj::mv(checkpoint);
  }
  return nullptr;
}

}  // namespace

CheckpointStore::CheckpointStore(std::string dataDir, StoreRecovery recovery) : dir_(std::move(dataDir)) {
  const std::string chain = dir_ + "/checkpoints";
  if (!fs::exists(chain)) {
    fs::create_directories(chain);
    syncDirectory(dir_);  // the chain's directory survives a power cut before state.json is first written
  }
  // Compaction's and resyncs' scratch files are never part of the chain.
  if (fs::exists(scratchDir())) fs::remove_all(scratchDir());
  if (fs::exists(resyncDir())) fs::remove_all(resyncDir());
  std::set<std::uint64_t> checkpoints, bases;
  for (const auto& entry : fs::directory_iterator(chain)) {
    const std::string name = entry.path().filename().string();
    if (name.ends_with(".tmp")) {
      // Whole files only: a temporary left by a crash was never committed.
      spdlog::info("discarding {} left by an interrupted write", name);
      fs::remove(entry.path());
    } else if (std::uint64_t s = sequenceOf(name, ".ckpt")) {
      checkpoints.insert(s);
    } else if (std::uint64_t b = sequenceOf(name, ".base")) {
      bases.insert(b);
    }
  }
  if (!bases.empty()) {
    // The newest fold is the base; a crash may have stopped the removal of
    // what it replaced, which is finished now.
    base_ = *bases.rbegin();
    foldedBase_ = true;
    std::string why;
    KJ_IF_MAYBE(checkpoint, readCheckpointFile(foldPath(base_), why)) {
      noteBase((*checkpoint)->reader());
    } else {
      fail("data directory {}: the base (checkpoint {} folded) is damaged ({}); restore it from a backup", dir_,
           base_, why);
    }
    for (std::uint64_t b : bases)
      if (b != base_) removeQuietly(foldPath(b));
    for (auto it = checkpoints.begin(); it != checkpoints.end() && *it <= base_;) {
      removeQuietly(checkpointPath(*it));
      it = checkpoints.erase(it);
    }
    syncDirectory(chain);
  } else if (!checkpoints.empty()) {
    if (*checkpoints.begin() != 1)
      fail("data directory {}: checkpoint 1 (the base) is missing; restore it from a backup", dir_);
    base_ = 1;
    checkpoints.erase(checkpoints.begin());
  }
  head_ = checkpoints.empty() ? base_ : *checkpoints.rbegin();
  // Every record is verified on start-up (as a log is replayed). A write
  // interrupted by a crash leaves only a temporary, removed above: a record
  // is fsynced before it is renamed into place, and acknowledged after. So a
  // damaged N.ckpt was committed and may have been acknowledged; it is never
  // dropped silently. At the head the operator may set it aside (see
  // StoreRecovery); below it newer ones depend on it. A missing checkpoint is
  // damage too, unless the one after the gap needs only the base.
  std::vector<std::uint64_t> order;
  if (base_ != 0 && !foldedBase_) order.push_back(base_);
  order.insert(order.end(), checkpoints.begin(), checkpoints.end());
  std::uint64_t previous = base_;
  std::uint64_t setAside = 0;
  for (std::uint64_t s : order) {
    std::string why;
    KJ_IF_MAYBE(record, readCheckpointFile(checkpointPath(s), why)) {
      StoredCheckpoint& checkpoint = **record;
      if (s == base_) noteBase(checkpoint.reader());
      if (checkpoint.reader().getKind() == wire::CheckpointKind::FINAL) resumablePoint_ = s;
      if (s > previous + 1 && !isOrigPolicy(checkpoint.reader().getPolicy()))
        fail("data directory {}: checkpoints {} to {} are missing and checkpoint {} depends on them; restore them "
             "from a backup", dir_, previous + 1, s - 1, s);
      if (s != base_) bytes_[s] = fs::file_size(checkpointPath(s));
      previous = s;
      continue;
    }
    if (s != head_)
      fail("data directory {}: checkpoint {} is damaged ({}) and newer ones depend on it; restore it from a backup",
           dir_, s, why);
    if (!recovery.setAsideDamagedHead)
      fail("data directory {}: checkpoint {}, the head of the chain, is damaged ({}). It was committed and may have "
           "been acknowledged, so it is not dropped: restore it from a backup, or start the server once with "
           "--set-aside-damaged-head to keep it as {}.ckpt.damaged and go on from checkpoint {} (what it held "
           "is lost)",
           dir_, s, why, s, previous == s ? 0 : previous);
    spdlog::warn("setting aside damaged checkpoint {}, the head of the chain, as asked: {}; the chain goes on from "
                 "checkpoint {}", s, why, previous == s ? 0 : previous);
    fs::rename(checkpointPath(s), checkpointPath(s) + ".damaged");
    setAside = s;
    syncDirectory(chain);
    if (s == base_) base_ = 0;
    head_ = previous == s ? 0 : previous;
    break;
  }
  std::ifstream in(dir_ + "/state.json");
  if (in) {
    try {
      auto j = nlohmann::json::parse(in);
      // Counters are whole numbers: a float or a negative number (which the
      // library would convert with undefined results) is damage.
      auto count = [&](const nlohmann::json& value, const char* what) -> std::uint64_t {
        if (!value.is_number_unsigned()) fail("data directory {}: state.json: {} is not a whole number", dir_, what);
        return value.get<std::uint64_t>();
      };
      auto field = [&](const char* name) -> std::uint64_t { return j.contains(name) ? count(j[name], name) : 0; };
      state_.vmId = j.value("vm_id", "");
      state_.epoch = field("epoch");
      state_.holder = j.value("holder", "");
      state_.owner = j.value("owner", "");
      state_.resumeOn = j.value("resume_on", "");
      state_.pauseIntent = j.value("pause_intent", "");
      state_.abandonedAfter = field("abandoned_after");
      state_.abandonedUpTo = field("abandoned_up_to");
      state_.abandonedTotal = field("abandoned_total");
      for (const auto& f : j.value("failovers", nlohmann::json::array()))
        state_.failovers.emplace_back(count(f.at(0), "a failover's point"), count(f.at(1), "a failover's epoch"));
      const nlohmann::json devices = j.value("devices", nlohmann::json::object());
      for (const auto& [id, applied] : devices.items())
        state_.appliedByDevice[id] = std::min(count(applied, "a device's applied sequence"), head_);
    } catch (const nlohmann::json::exception& e) {
      fail("data directory {}: state.json is unreadable: {}", dir_, e.what());
    }
  }
  if (setAside != 0) {
    // As a failover abandons what came after its point: the lease moves to a
    // new epoch nobody holds, and a device that applied the lost checkpoint
    // (or runs the VM past it) is resynced to the chain when it registers.
    ++state_.epoch;
    state_.holder.clear();
    state_.resumeOn.clear();
    state_.abandonedAfter = head_;
    state_.abandonedUpTo = std::max(state_.abandonedUpTo, setAside);
    state_.abandonedTotal += 1;
    state_.failovers.emplace_back(head_, state_.epoch);
    saveState(state_);
  }
  finishInterruptedFailover();
  if (base_ != 0) baseBytes_ = fs::file_size(pathOf(base_));
}

void CheckpointStore::finishInterruptedFailover() {
  if (state_.failovers.empty()) return;
  const auto [point, epoch] = state_.failovers.back();
  // The failover is recorded before its checkpoints move: if the one after
  // its point is still in the chain under an older lease, the move was cut
  // short (what the chain gained after a failover has its new epoch).
  if (head_ <= point || !bytes_.contains(point + 1) || read(point + 1)->reader().getEpoch() >= epoch) return;
  const std::uint64_t oldHead = head_;
  const std::uint64_t moved = abandonAfter(point, epoch);
  spdlog::warn("data directory {}: the failover to lease epoch {} stopped before it had moved checkpoints {}..{} "
               "to abandoned/; {} moved now, the chain goes on from checkpoint {}",
               dir_, epoch, point + 1, oldHead, moved, point);
  state_.abandonedTotal += moved;
  for (auto& [device, applied] : state_.appliedByDevice) applied = std::min(applied, head_);
  saveState(state_);
}

void CheckpointStore::noteBase(wire::Checkpoint::Reader base) {
  memoryBytes_ = base.hasSpec() ? base.getSpec().getMemoryBytes() : 0;
  diskBytes_ = base.hasSpec() ? base.getSpec().getDiskBytes() : 0;
}

std::string CheckpointStore::checkpointPath(std::uint64_t sequence) const {
  return fmt::format("{}/checkpoints/{:020}.ckpt", dir_, sequence);
}

std::string CheckpointStore::foldPath(std::uint64_t sequence) const {
  return fmt::format("{}/checkpoints/{:020}.base", dir_, sequence);
}

std::string CheckpointStore::pathOf(std::uint64_t sequence) const {
  if (!stored(sequence)) {
    if (sequence != 0 && sequence < head_)
      fail("checkpoint {} is no longer stored: it was compacted into the base at {}", sequence, base_);
    fail("checkpoint {} is not stored (the chain ends at {})", sequence, head_);
  }
  return sequence == base_ && foldedBase_ ? foldPath(sequence) : checkpointPath(sequence);
}

std::uint64_t CheckpointStore::bytesAfterBase() const {
  std::uint64_t total = 0;
  for (const auto& [sequence, bytes] : bytes_) total += bytes;
  return total;
}

void CheckpointStore::append(wire::Checkpoint::Reader checkpoint) {
  auto pending = copyForAppend(checkpoint);
  placeAppend(*pending);
  writeAppend(*pending);
  commitAppend(*pending);
}

std::shared_ptr<CheckpointStore::PendingAppend> CheckpointStore::copyForAppend(wire::Checkpoint::Reader checkpoint) {
  capnp::MallocMessageBuilder message;
  message.setRoot(checkpoint);
  auto words = capnp::messageToFlatArray(message);
  if (words.asBytes().size() > kMaxRecordPayload)
    fail("checkpoint {} is {} bytes, above the store's limit of {}", checkpoint.getSequence(), words.asBytes().size(),
         kMaxRecordPayload);
  auto pending = std::make_shared<PendingAppend>();
  pending->checkpoint = kj::refcounted<StoredCheckpoint>(kj::mv(words));
  return pending;
}

void CheckpointStore::placeAppend(PendingAppend& pending) const {
  pending.sequence = head_ + 1;
  pending.path = checkpointPath(pending.sequence);
}

void CheckpointStore::writeAppend(const PendingAppend& pending) {
  if (beforeAppendWriteForTests) beforeAppendWriteForTests(pending.path);
  auto bytes = pending.checkpoint->asBytes();
  writeRecordFile(pending.path, std::as_bytes(std::span(bytes.begin(), bytes.size())), /*crashPoints=*/true);
}

void CheckpointStore::commitAppend(PendingAppend& pending) {
  if (pending.sequence == 0 || pending.sequence != head_ + 1)
    fail("checkpoint {} was written while the chain moved to {}: it is not the next one", pending.sequence, head_);
  const std::uint64_t recordBytes = sizeof(RecordHeader) + pending.checkpoint->bytes();
  auto checkpoint = pending.checkpoint->reader();
  recentPath_ = pending.path;
  ++head_;
  if (checkpoint.getKind() == wire::CheckpointKind::FINAL) resumablePoint_ = head_;
  if (base_ == 0) {
    base_ = head_;
    baseBytes_ = recordBytes;
    noteBase(checkpoint);
  } else {
    bytes_[head_] = recordBytes;
  }
  recent_ = kj::mv(pending.checkpoint);
}

kj::Own<StoredCheckpoint> CheckpointStore::read(std::uint64_t sequence) const {
  std::string path = pathOf(sequence);
  if (path == recentPath_) KJ_IF_MAYBE(recent, recent_) { return kj::addRef(**recent); }
  std::string why;
  KJ_IF_MAYBE(checkpoint, readCheckpointFile(path, why)) { return kj::mv(*checkpoint); }
  fail("checkpoint {} is damaged: {}", path, why);
}

void CheckpointStore::removeQuietly(const std::string& path) {
  std::error_code ec;
  fs::remove(path, ec);
  if (ec) spdlog::warn("cannot remove {}: {} (it is removed at the next start)", path, ec.message());
}

void CheckpointStore::commitFold(std::uint64_t sequence) { commitFoldLater(sequence)(); }

std::function<void()> CheckpointStore::commitFoldLater(std::uint64_t sequence) {
  if (!bytes_.contains(sequence) || !fs::exists(foldPath(sequence)))
    fail("cannot fold at checkpoint {}: it is not stored after the base, or its folded image was not written",
         sequence);
  // The fold file was committed when it was renamed into place: from here on
  // the base is at `sequence`, and what it replaces goes.
  std::vector<std::string> gone{pathOf(base_)};
  base_ = sequence;
  foldedBase_ = true;
  baseBytes_ = fs::file_size(foldPath(sequence));
  for (auto it = bytes_.begin(); it != bytes_.end() && it->first <= sequence; it = bytes_.erase(it))
    gone.push_back(checkpointPath(it->first));
  return removal(std::move(gone));
}

void CheckpointStore::prune(std::uint64_t sequence) { pruneLater(sequence)(); }

std::function<void()> CheckpointStore::pruneLater(std::uint64_t sequence) {
  if (!bytes_.contains(sequence)) fail("cannot prune below checkpoint {}: it is not stored", sequence);
  std::vector<std::string> gone;
  for (auto it = bytes_.begin(); it != bytes_.end() && it->first < sequence; it = bytes_.erase(it))
    gone.push_back(checkpointPath(it->first));
  return removal(std::move(gone));
}

std::function<void()> CheckpointStore::removal(std::vector<std::string> paths) const {
  return [paths = std::move(paths), dir = dir_ + "/checkpoints"] {
    for (const auto& path : paths) removeQuietly(path);
    syncDirectory(dir);
  };
}

std::uint64_t CheckpointStore::abandonAfter(std::uint64_t sequence, std::uint64_t epoch) {
  if (sequence > head_ || sequence < base_) fail("cannot abandon the chain after {}: it is not stored", sequence);
  const std::string kept = dir_ + "/abandoned";
  fs::create_directories(kept);
  // From the head down: a crash leaves a shorter chain that still follows on.
  std::uint64_t count = 0;
  for (std::uint64_t s = head_; s > sequence; --s) {
    if (bytes_.contains(s)) {
      fs::rename(checkpointPath(s), fmt::format("{}/epoch-{}-{:08}.ckpt", kept, epoch, s));
      bytes_.erase(s);
      ++count;
    }
    head_ = s - 1;
  }
  syncDirectory(kept);
  syncDirectory(dir_ + "/checkpoints");
  recentPath_.clear();
  recent_ = nullptr;
  return count;
}

CheckpointStore::StateFile CheckpointStore::stateFile(const ServerState& state) {
  nlohmann::json j;
  j["vm_id"] = state.vmId;
  j["epoch"] = state.epoch;
  j["holder"] = state.holder;
  j["owner"] = state.owner;
  j["resume_on"] = state.resumeOn;
  j["pause_intent"] = state.pauseIntent;
  j["abandoned_after"] = state.abandonedAfter;
  j["abandoned_up_to"] = state.abandonedUpTo;
  j["abandoned_total"] = state.abandonedTotal;
  j["failovers"] = nlohmann::json::array();
  for (const auto& [after, epoch] : state.failovers) j["failovers"].push_back({after, epoch});
  j["devices"] = nlohmann::json::object();
  for (const auto& [id, applied] : state.appliedByDevice) j["devices"][id] = applied;
  return {++stateGeneration_, j.dump(2)};
}

void CheckpointStore::saveState(const ServerState& state) { saveStateLater(state)(); }

std::function<void()> CheckpointStore::saveStateLater(const ServerState& state) {
  state_ = state;
  // The job holds the writer and the path, not the store: it may outlive it.
  auto file = std::make_shared<StateFile>(stateFile(state));
  return [writer = stateWriter_, path = dir_ + "/state.json", file] {
    std::lock_guard lock(writer->mutex);
    if (file->generation <= writer->written) return;
    writeFileDurably(path, file->text.data(), file->text.size());
    writer->written = file->generation;
  };
}

}  // namespace vmsync
