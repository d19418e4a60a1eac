// Checkpoints on their way to the devices that follow the chain: forwarded
// as they are stored, a stale device caught up in one merge, each device's
// applies in order.
#include <spdlog/spdlog.h>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <chrono>

#include "base/error.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint_merge.h"
#include "server_metrics.h"
#include "sync_server.h"
#include "transport/rpc_util.h"

namespace vmsync {

void SyncServer::forwardUpTo(DeviceEntry& entry, std::uint64_t sequence) {
  // The lease holder makes the checkpoints; it never receives them.
  if (!entry.peer || !entry.failure.empty() || entry.resyncing || entry.id == state_.holder) return;
  const std::uint64_t connection = entry.connection;
  const std::string id = entry.id;
  // One step per call: the step catches up to `sequence` from wherever the
  // device is when it runs, so K missed checkpoints travel as one merge.
  if (std::max(entry.queued, entry.applied) < sequence) {
    kj::Promise<void> previous = kj::READY_NOW;
    KJ_IF_MAYBE(tail, entry.tail) { previous = tail->addBranch(); }
    auto next = previous.then([this, id, sequence, connection]() { return catchUp(id, connection, sequence); });
    entry.tail = next.fork();
  }
  entry.queued = std::max(entry.queued, sequence);
}

kj::Promise<void> SyncServer::catchUp(std::string id, std::uint64_t connection, std::uint64_t to) {
  DeviceEntry& d = device(id);
  // Up to the head as it is now, not as it was when this step was queued:
  // on a link slower than the checkpoints come, what piled up meanwhile
  // travels as one merge, where one checkpoint per step would leave the
  // device further behind with every push. (A `to` compacted or abandoned
  // since is gone; the head is always there.)
  to = store_.head();
  if (!d.peer || d.connection != connection || !d.failure.empty() || d.applied >= to) return kj::READY_NOW;
  // A device behind the base (new, or offline across a compaction) starts
  // over from the base: a full checkpoint replaces its whole image.
  const std::uint64_t base = store_.base();
  const bool behindBase = d.applied < base;
  const std::uint64_t from = behindBase ? base : d.applied + 1;
  if (to > from) {
    // Under an Orig policy a checkpoint needs only the base (the full one):
    // a device that has it catches up with the latest checkpoint alone. Orig
    // checkpoints are never merged: a unit left out of a later one returns to
    // the base, which a union of chunks would not do.
    auto latest = store_.read(to);
    auto latestReader = latest->reader();
    if (latestReader.getKind() != wire::CheckpointKind::FULL && isOrigPolicy(latestReader.getPolicy())) {
      if (!behindBase) {
        log_->info("catch-up for {}: checkpoint {} alone (Orig policy; {} skipped)", id, to, to - from);
        return sendApply(id, connection, latestReader).attach(kj::mv(latest));
      }
      log_->info("catch-up for {}: the base (checkpoint {}) first, then checkpoint {}", id, base, to);
      auto full = store_.read(base);
      auto fullReader = full->reader();
      return sendApply(id, connection, fullReader).attach(kj::mv(full)).then([this, id, connection, to]() {
        return catchUp(id, connection, to);
      });
    }
    std::vector<kj::Own<StoredCheckpoint>> stored;
    std::vector<wire::Checkpoint::Reader> run;
    std::uint64_t missedBytes = 0;
    for (std::uint64_t s = from; s <= to; ++s) {
      stored.push_back(store_.read(s));
      run.push_back(stored.back()->reader());
      missedBytes += stored.back()->bytes();
    }
    auto merged = kj::heap<capnp::MallocMessageBuilder>();
    std::string refused = mergeCheckpoints(run, merged->initRoot<wire::Checkpoint>());
    if (refused.empty()) {
      const std::uint64_t mergedBytes = capnp::computeSerializedSizeInWords(*merged) * sizeof(capnp::word);
      log_->info("catch-up for {}: checkpoints {}..{} ({} checkpoints{}, {} bytes) merged into one of {} bytes", id,
                 from, to, to - from + 1, behindBase ? ", from the base" : "", missedBytes, mergedBytes);
      auto reader = merged->getRoot<wire::Checkpoint>().asReader();
      return sendApply(id, connection, reader).attach(kj::mv(merged));
    }
    log_->info("catch-up for {}: sending checkpoints {}..{} ({} bytes) one by one ({})", id, from, to,
               missedBytes, refused);
  }
  auto one = store_.read(from);
  auto reader = one->reader();
  if (to > from)
    log_->info("catch-up for {}: checkpoint {} ({} bytes), {} more to go", id, from, one->bytes(), to - from);
  return sendApply(id, connection, reader).attach(kj::mv(one)).then([this, id, connection, to]() {
    return catchUp(id, connection, to);
  });
}

kj::Promise<void> SyncServer::sendApply(std::string id, std::uint64_t connection,
                                        wire::Checkpoint::Reader checkpoint) {
  DeviceEntry& d = device(id);
  const std::uint64_t s = checkpoint.getSequence();
  auto request = d.peer->applyRequest();
  request.setCheckpoint(checkpoint);
  std::uint64_t start = nowNs();
  d.sendingSequence = s;
  d.sendingBytes = request.totalSize().wordCount * sizeof(capnp::word);
  d.sendingSinceNs = start;
  d.sentBytes += d.sendingBytes;
  return request.send().then(
      [this, id, connection, start](capnp::Response<wire::DevicePeer::ApplyResults> response) {
        DeviceEntry& d = device(id);
        if (d.connection != connection) return;
        d.sendingSequence = 0;
        d.lastForwardNs = nowNs() - start;
        d.lastApplyNs = response.getApplyNs();
        d.applied = response.getAppliedSequence();
        if (metrics_) {
          metrics_->forwarded(label_, d.sendingBytes, static_cast<double>(d.lastForwardNs) / 1e9);
          publishMetrics();
        }
        persistAppliedSoon();
      },
      [this, id, s, connection](kj::Exception&& e) {
        DeviceEntry& d = device(id);
        if (d.connection != connection) return;
        d.sendingSequence = 0;
        d.failure = fmt::format("applying checkpoint {} failed: {}", s, describe(e));
        log_->warn("device {}: {}", id, d.failure);
      });
}

kj::Promise<void> SyncServer::drained(DeviceEntry& entry) {
  KJ_IF_MAYBE(tail, entry.tail) { return tail->addBranch(); }
  return kj::READY_NOW;
}

}  // namespace vmsync
