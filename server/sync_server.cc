#include "sync_server.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/checkpoint_identity.h"
#include "compactor.h"
#include "server_metrics.h"
#include "store_workers.h"
#include "checkpoint/checkpoint_record.h"
#include "base/background.h"
#include "base/error.h"
#include "transport/rpc_util.h"
#include "base/units.h"

namespace vmsync {

SyncServer::SyncServer(std::string dataDir, CompactionLimits compaction, kj::Timer* timer, StoreRecovery recovery)
    : store_(std::move(dataDir), recovery),
      limits_(compaction),
      state_(store_.state()),
      timer_(timer),
      lastRenewalNs_(nowNs()) {
  for (const auto& [id, applied] : state_.appliedByDevice) {
    auto entry = std::make_unique<DeviceEntry>();
    entry->id = id;
    entry->applied = applied;
    devices_[id] = std::move(entry);
  }
  if (store_.head() > store_.base()) noteHead(store_.read(store_.head())->reader());
  recoverInterruptedPause();
  log_->info("VM '{}' in {}: chain at {} (base {}), lease epoch {} held by '{}'{}", state_.vmId, store_.dir(),
             store_.head(), store_.base(), state_.epoch, state_.holder,
             parked() ? fmt::format("; parked by {}", headOrigin_) : "");
}

SyncServer::~SyncServer() {
  // Store steps still queued or being written end here: a caller that holds
  // one (a push's RPC call) sees it fail, and nothing comes back to this
  // object once it is gone.
  storeCanceler_.cancel("the VM's server stopped");
  if (appliedUnsaved_) {
    try {
      persist();
    } catch (const std::exception& e) {
      log_->warn("saving where the devices are failed: {}", e.what());
    }
  }
  // A fold under way is abandoned: its file is written whole or not at all,
  // and the next start discards its scratch space.
  cancelCompaction_ = true;
  if (compactor_.joinable()) compactor_.join();
  if (compacting_) foldDone();
  cancelResync_ = true;
  if (resyncer_.joinable()) resyncer_.join();
}

void SyncServer::maybeCompact(wire::Policy policy, bool now) {
  if (compacting_ || (!now && store_.head() < retryCompactionAt_)) return;
  const std::uint64_t count = store_.countAfterBase();
  const std::uint64_t bytes = store_.bytesAfterBase();
  const bool due = now || (limits_.checkpoints != 0 && count >= limits_.checkpoints) ||
                   (limits_.bytes != 0 && bytes >= limits_.bytes);
  if (!due || count == 0) return;
  if (isOrigPolicy(policy)) {
    // Each Orig checkpoint needs only the base: the newest one makes the
    // others useless, to every device.
    // Not past the resumable point: a failover resumes from it.
    const std::uint64_t point = store_.resumablePoint();
    const std::uint64_t to = point > store_.base() ? std::min(store_.head(), point) : store_.head();
    if (count < 2 || to == store_.first()) return;
    runCleanup(store_.pruneLater(to));
    log_->info("compaction: removed {} checkpoints ({} bytes) older than {}, which needs only the base",
               count - store_.countAfterBase(), bytes - store_.bytesAfterBase(), to);
    return;
  }
  // Fold no further than the online standbys have applied: they go on from
  // where they are instead of starting over from the new base.
  // A standby that lags by twice the limit no longer holds the chain back
  // (it will start over from the base), so the directory stays bounded.
  std::uint64_t to = store_.head();
  const bool overdue = (limits_.checkpoints != 0 && count >= 2 * limits_.checkpoints) ||
                       (limits_.bytes != 0 && bytes >= 2 * limits_.bytes);
  if (!overdue)
    for (const auto& [id, entry] : devices_)
      if (entry->peer && entry->failure.empty() && id != state_.holder) to = std::min(to, entry->applied);
  // The newest final checkpoint is where a parked VM, or a failover, resumes:
  // it stays in the chain with its device state.
  if (store_.resumablePoint() > store_.base()) to = std::min(to, store_.resumablePoint() - 1);
  if (to <= store_.base()) return;
  // Folds of many VMs at once would take the server's CPU and memory from
  // every push (chains that were started together come due together): past
  // the server's limit this one waits, and the next push asks again.
  if (foldSlots_ && !foldSlots_->tryTake(1)) {
    if (!waitingForFold_) log_->info("compaction due; waiting for one of the other VMs' folds to finish");
    waitingForFold_ = true;
    return;
  }
  waitingForFold_ = false;
  std::vector<std::string> paths;
  paths.push_back(store_.pathOf(store_.base()));
  for (std::uint64_t s = store_.first(); s <= to; ++s) paths.push_back(store_.pathOf(s));
  const std::string out = store_.foldPath(to);
  const std::string scratch = store_.scratchDir();
  log_->info("compaction: folding checkpoints {}..{} ({} checkpoints) into a new base", store_.base(), to,
             paths.size());
  auto done = kj::newPromiseAndCrossThreadFulfiller<void>();
  auto outcome = std::make_shared<std::string>();  // written by the worker before it fulfils
  compacting_ = true;
  const std::uint64_t start = nowNs();
  // Held through a shared_ptr: std::thread needs a callable whose destructor
  // cannot throw, which kj::Own's is not declared to be.
  auto fulfiller =
      std::make_shared<kj::Own<kj::CrossThreadPromiseFulfiller<void>>>(kj::mv(done.fulfiller));
  compactor_ = std::thread([this, paths = std::move(paths), out, scratch, fulfiller, outcome]() {
    // A fold can wait; the pushes of the VMs beside it should not.
    if (!runInBackground()) log_->debug("compaction: the fold runs at the usual priority (the kernel refused a lower one)");
    try {
      FoldStats stats = foldChain(paths, scratch, out, cancelCompaction_);
      *outcome = fmt::format("{} non-zero pages, {} non-zero blocks, {} bytes", stats.memoryUnits, stats.diskUnits,
                            stats.bytes);
    } catch (const std::exception& e) {
      *outcome = std::string("!") + e.what();
    } catch (const kj::Exception& e) {
      *outcome = std::string("!") + describe(e);
    }
    (*fulfiller)->fulfill();
  });
  compaction_ = done.promise
                    .then([this, to, start, outcome]() {
                      compactor_.join();
                      if (outcome->starts_with("!")) {
                        // Not again at every push: after as many checkpoints again.
                        retryCompactionAt_ = store_.head() + std::max<std::uint64_t>(limits_.checkpoints, 16);
                        log_->warn("compaction at {} failed: {}; the chain is kept as it is (next try at {})", to,
                                   outcome->substr(1), retryCompactionAt_);
                        if (metrics_) metrics_->folded(static_cast<double>(nowNs() - start) / 1e9, false);
                        return;
                      }
                      crashPoint("fold-before-commit");  // the new base is in place, the old chain too
                      runCleanup(store_.commitFoldLater(to));
                      log_->info("compaction: the base is now checkpoint {} ({}), {:.0f} ms", to, *outcome,
                                 (nowNs() - start) / 1e6);
                      if (metrics_) metrics_->folded(static_cast<double>(nowNs() - start) / 1e9, true);
                    })
                    .then([this]() { foldDone(); },
                          [this](kj::Exception&& e) {
                            log_->warn("compaction failed: {}", describe(e));
                            foldDone();
                          })
                    .eagerlyEvaluate(nullptr);
}

wire::SyncServer::Client SyncServer::client(const PeerIdentity& peer, std::shared_ptr<ConnectionGate> gate) {
  return syncServiceClient(*this, peer, std::move(gate));
}

void SyncServer::setIdentity(const std::string& user, const std::string& name) {
  name_ = name;
  label_ = user.empty() ? name : user + "/" + name;
  // Every line of this VM names it: a server holds many. A sink of its own
  // (console sinks share one lock), with the command's pattern and the VM.
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  sink->set_pattern("[%H:%M:%S.%e] %^%l%$ VM %n: %v");
  log_ = std::make_shared<spdlog::logger>(label_, std::move(sink));
  log_->set_level(spdlog::default_logger()->level());
  if (!state_.vmId.empty() && state_.vmId != name)
    fail("data directory {} holds VM '{}', not '{}'", store_.dir(), state_.vmId, name);
  if (state_.owner != user && !user.empty()) {
    state_.owner = user;
    persist();
  }
}

SyncServer& SyncServer::vm(const PeerIdentity& peer, const std::string& name, const char* action, bool create) {
  const std::string& mine = vmId();
  if (!name.empty() && !mine.empty() && name != mine && name != label_)
    fail("this server holds VM '{}' alone, not '{}'", mine, name);
  authorize(peer, action, /*claim=*/create);
  return *this;
}

std::vector<SyncServer*> SyncServer::vmsOf(const PeerIdentity& peer) {
  if (peer.authenticated && peer.user != state_.owner) return {};
  return {this};
}

void SyncServer::setMetrics(std::shared_ptr<ServerMetrics> metrics) {
  metrics_ = std::move(metrics);
  publishMetrics();
}

void SyncServer::publishMetrics() {
  if (!metrics_) return;
  for (const auto& [id, entry] : devices_) metrics_->devicePosition(label_, id, store_.head(), entry->applied);
  metrics_->vmState(label_, state_.epoch, resumablePointCreatedNs());
}

void SyncServer::audit(AuditEvent event) {
  if (audit_ == nullptr) return;
  if (event.vm.empty()) event.vm = label_.empty() ? state_.vmId : label_;
  audit_->record(event);
}

void SyncServer::refuse(const PeerIdentity& peer, const char* action, const std::string& reason) {
  log_->warn("refused: {}", reason);
  if (metrics_) metrics_->refused(action);
  audit({.action = action, .result = "refused", .user = peer.user, .device = peer.device, .reason = reason});
  fail("{}", reason);
}

void SyncServer::authorize(const PeerIdentity& peer, const char* action, bool claim) {
  if (!peer.authenticated) return;  // an --insecure server trusts its network
  if (state_.owner.empty()) {
    if (!claim) return;  // nothing here yet that belongs to anyone
    state_.owner = peer.user;
    persist();
    log_->info("this server's VM now belongs to user {} (claimed by {})", peer.user, peer.describe());
    audit({.action = "claim", .result = "granted", .user = peer.user, .device = peer.device,
           .reason = "the first user to register a device owns the server's VM"});
    return;
  }
  if (peer.user != state_.owner)
    refuse(peer, action,
           fmt::format("{} may not {} VM '{}': it belongs to user {}", peer.describe(), action,
                       state_.vmId.empty() ? "(none yet)" : state_.vmId, state_.owner));
}

DeviceEntry& SyncServer::device(const std::string& id) {
  auto& slot = devices_[id];
  if (!slot) {
    slot = std::make_unique<DeviceEntry>();
    slot->id = id;
  }
  return *slot;
}

void SyncServer::persist() {
  for (const auto& [id, entry] : devices_) state_.appliedByDevice[id] = entry->applied;
  store_.saveState(state_);
  appliedUnsaved_ = false;
}

void SyncServer::foldDone() {
  compacting_ = false;
  if (foldSlots_) foldSlots_->give(1);
}

void SyncServer::runCleanup(std::function<void()> job) {
  if (!timer_) return job();  // no event loop to come back to (unit tests): here and now
  compactionCleanup_ = StoreWorkers::shared().run(std::move(job)).eagerlyEvaluate([this](kj::Exception&& e) {
    log_->warn("removing the files compaction replaced failed: {} (a fold's are removed at the next start, a "
               "prune's at the next prune)", describe(e));
  });
}

void SyncServer::persistLater() {
  for (const auto& [id, entry] : devices_) state_.appliedByDevice[id] = entry->applied;
  appliedUnsaved_ = false;
  appliedSave_ = StoreWorkers::shared().run(store_.saveStateLater(state_)).eagerlyEvaluate([this](kj::Exception&& e) {
    appliedUnsaved_ = true;  // saved again at the next change, or at the end
    log_->warn("saving where the devices are failed: {}", describe(e));
  });
}

void SyncServer::persistAppliedSoon() {
  // Where each device is on the chain is advisory: a device says where it is
  // when it registers, and nothing decides from a saved position of an
  // offline one. Written at every push and every apply, state.json was the
  // server's heaviest use of the disk (a new file, two fsyncs, each time).
  if (!timer_) return persist();
  appliedUnsaved_ = true;
  if (flushScheduled_) return;
  flushScheduled_ = true;
  // Replaces a flush that has run (never one still pending).
  appliedFlush_ = timer_->afterDelay(kAppliedFlushDelay)
                      .then([this] {
                        flushScheduled_ = false;
                        if (appliedUnsaved_) persistLater();
                      })
                      .eagerlyEvaluate([this](kj::Exception&& e) {
                        flushScheduled_ = false;
                        log_->warn("saving where the devices are failed: {}", describe(e));
                      });
}

void SyncServer::noteHead(wire::Checkpoint::Reader head) {
  headIsFinal_ = head.getKind() == wire::CheckpointKind::FINAL;
  headOrigin_ = head.getOrigin();
}

std::string SyncServer::abandonedBy(std::uint64_t applied, std::uint64_t epoch) const {
  if (applied > store_.head() && applied <= state_.abandonedUpTo)
    return fmt::format("it is at checkpoint {}, past this chain's end at {}: a failover abandoned the checkpoints "
                       "after {}", applied, store_.head(), state_.abandonedAfter);
  // Checkpoints after a failover's point carry its epoch or a newer one.
  for (const auto& [after, failoverEpoch] : state_.failovers)
    if (applied > after && epoch != 0 && epoch < failoverEpoch)
      return fmt::format("its checkpoint {} (lease epoch {}) is one a failover abandoned when it resumed the VM "
                         "from checkpoint {} under epoch {}", applied, epoch, after, failoverEpoch);
  return "";
}

kj::Promise<std::uint64_t> SyncServer::registerDevice(const std::string& id, wire::DevicePeer::Client peer,
                                                      std::uint64_t applied, std::uint64_t appliedEpoch,
                                                      bool diverged) {
  if (id.empty() || id.size() > 64) fail("device id must be 1 to 64 characters");
  const std::string abandoned = abandonedBy(applied, appliedEpoch);
  if (applied > store_.head() && abandoned.empty())
    fail("device {} says it applied checkpoint {}, but this server's chain ends at {}; "
         "its state does not belong to this server", id, applied, store_.head());
  // Its image is not the chain's at `applied`: a resync brings it back.
  const bool resync = applied != 0 && (diverged || !abandoned.empty());
  if (resync)
    log_->info("device {}: {}; it is resynced to the chain", id,
               abandoned.empty() ? fmt::format("its VM ran past checkpoint {}", applied) : abandoned);
  DeviceEntry& entry = device(id);
  if (!entry.peer) return completeRegistration(id, kj::mv(peer), applied, resync);
  // Registered already: a second daemon for this device, or the same one
  // back after a connection the server has not yet seen break. The earlier
  // registration decides: while it answers, the new one is refused.
  const std::uint64_t earlier = entry.connection;
  kj::Promise<void> answer = entry.peer->pingRequest().send().ignoreResult();
  if (timer_) answer = timer_->timeoutAfter(3 * kj::SECONDS, kj::mv(answer));
  return answer.then(
      [id]() -> std::uint64_t {
        rpcFail(fmt::format("device {} is already connected to this server and answers there; stop that daemon "
                            "first (two daemons cannot speak for one device)", id));
      },
      [this, id, peer = kj::mv(peer), applied, earlier, resync](kj::Exception&& e) mutable -> std::uint64_t {
        DeviceEntry& entry = device(id);
        if (entry.peer && entry.connection != earlier)
          rpcFail(fmt::format("device {} registered again meanwhile; try again", id));
        log_->info("device {}: its earlier registration does not answer ({}); the new one replaces it", id,
                   describe(e));
        return completeRegistration(id, kj::mv(peer), applied, resync);
      });
}

std::uint64_t SyncServer::completeRegistration(const std::string& id, wire::DevicePeer::Client peer,
                                               std::uint64_t applied, bool resync) {
  if (id == fenced_) {
    // It came back with a credential that was not revoked: the user enrolled it again.
    log_->info("device {} is back with a new credential: no longer fenced", id);
    fenced_.clear();
  }
  if (applied > store_.head() && !resync)
    fail("device {} says it applied checkpoint {}, but this server's chain ends at {}; "
         "its state does not belong to this server", id, applied, store_.head());
  DeviceEntry& entry = device(id);
  entry.peer = kj::mv(peer);
  entry.connection = ++connections_;
  entry.applied = applied;
  entry.queued = applied;
  entry.failure.clear();
  entry.tail = nullptr;
  entry.resyncing = false;
  persist();
  log_->info("device {} registered at sequence {} (head {})", id, applied, store_.head());
  if (resync) {
    resyncDevice(id, entry.connection, "it left the chain").detach([](kj::Exception&&) {});
  } else {
    forwardUpTo(entry, store_.head());
    if (id == state_.resumeOn) resumeInterruptedSwitch(id);
  }
  return entry.connection;
}

void SyncServer::unregister(const std::string& id, std::uint64_t connection) {
  auto it = devices_.find(id);
  if (it == devices_.end() || it->second->connection != connection) return;
  it->second->peer.reset();
  it->second->tail = nullptr;
  log_->info("device {} went offline at sequence {}", id, it->second->applied);
}

std::optional<std::uint64_t> SyncServer::checkPush(const std::string& id, wire::Checkpoint::Reader checkpoint) {
  // Content first: a malformed checkpoint is refused with what is wrong with
  // it, whoever sent it, before anything is stored.
  const bool isFull = checkpoint.getKind() == wire::CheckpointKind::FULL;
  std::uint64_t memoryUnits = store_.memoryBytes() / kUnitSize, diskUnits = store_.diskBytes() / kUnitSize;
  if (isFull) {
    if (!checkpoint.hasSpec()) fail("full checkpoint {} rejected: it has no VM spec", checkpoint.getSequence());
    auto spec = checkpoint.getSpec();
    if (spec.getMemoryBytes() == 0 || spec.getMemoryBytes() % kUnitSize || spec.getMemoryBytes() > (1ull << 40) ||
        spec.getDiskBytes() == 0 || spec.getDiskBytes() % kUnitSize || spec.getDiskBytes() > (1ull << 44))
      fail("full checkpoint {} rejected: invalid image sizes (RAM {} bytes, disk {} bytes)", checkpoint.getSequence(),
           spec.getMemoryBytes(), spec.getDiskBytes());
    memoryUnits = spec.getMemoryBytes() / kUnitSize;
    diskUnits = spec.getDiskBytes() / kUnitSize;
  } else if (memoryUnits == 0) {
    fail("checkpoint {} rejected: the server has no VM yet, so the first checkpoint must be full",
         checkpoint.getSequence());
  }
  try {
    validateCheckpoint(checkpoint, memoryUnits, diskUnits);
  } catch (const Error& e) {
    fail("checkpoint {} from {} rejected: {}", checkpoint.getSequence(), id, e.what());
  }
  if (state_.holder != id || checkpoint.getEpoch() != state_.epoch)
    fail("checkpoint {} from {} rejected: the device was fenced (its lease epoch is {}, the current lease is "
         "epoch {} held by '{}')", checkpoint.getSequence(), id, checkpoint.getEpoch(), state_.epoch, state_.holder);
  if (checkpoint.getSequence() == store_.head() && store_.head() > 0 &&
      checkpointDigest(checkpoint) == checkpointDigest(store_.read(store_.head())->reader())) {
    // A push re-sent after its answer was lost: the chain holds it already.
    log_->info("checkpoint {} from {} is already stored (same epoch and content); acknowledged again",
               checkpoint.getSequence(), id);
    return store_.head();
  }
  if (checkpoint.getSequence() != store_.head() + 1 || checkpoint.getBaseSequence() != store_.head())
    fail("checkpoint {} (based on {}) rejected: the chain ends at {}", checkpoint.getSequence(),
         checkpoint.getBaseSequence(), store_.head());
  bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  if (full != (store_.head() == 0))
    fail("checkpoint {} rejected: the first checkpoint must be full, and only the first", checkpoint.getSequence());
  if (full) {
    std::string vm = checkpoint.getSpec().getVmId();
    if (vm.empty()) fail("full checkpoint rejected: its VM spec has no vmId");
    if (!name_.empty() && vm != name_)
      fail("full checkpoint for VM '{}' rejected: it was pushed to VM '{}'", vm, label_);
  } else if (std::string(checkpoint.getVmId()) != state_.vmId) {
    fail("checkpoint for VM '{}' rejected: this server holds VM '{}'", std::string(checkpoint.getVmId()),
         state_.vmId);
  }
  if (admitPush_) admitPush_(*this, checkpoint, checkpoint.totalSize().wordCount * sizeof(capnp::word));
  return std::nullopt;
}

void SyncServer::recordPush(const std::string& id) {
  auto stored = store_.read(store_.head());  // from memory
  auto checkpoint = stored->reader();
  const bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  if (full) state_.vmId = checkpoint.getSpec().getVmId();
  storedBytes_ += stored->bytes();
  if (metrics_) metrics_->stored(label_, stored->bytes());
  noteHead(checkpoint);
  lastRenewalNs_ = nowNs();
  DeviceEntry& origin = device(id);
  origin.applied = origin.queued = store_.head();
  if (full) persist();  // the VM's name and sizes
  else persistAppliedSoon();
  crashPoint("before-ack");
  for (auto& [other, entry] : devices_)
    if (other != id) forwardUpTo(*entry, store_.head());
  publishMetrics();
  maybeCompact(checkpoint.getPolicy());
}

std::uint64_t SyncServer::push(const std::string& id, wire::Checkpoint::Reader checkpoint) {
  if (auto stored = checkPush(id, checkpoint)) return *stored;
  store_.append(checkpoint);
  recordPush(id);
  return store_.head();
}

kj::Promise<std::uint64_t> SyncServer::pushAsync(const std::string& id, wire::Checkpoint::Reader checkpoint) {
  // Copied now: the message it came in may be gone by the time the pushes
  // before it are stored.
  auto pending = guarded([&] { return CheckpointStore::copyForAppend(checkpoint); });
  kj::Promise<std::uint64_t> stored = nullptr;
  if (pushSlots_) {
    // Past the server's limit of pushes at once the push waits (its device
    // waits for the answer); the unit goes back however it ends.
    auto slots = pushSlots_;
    stored = slots->take(1).then([this, id, pending, slots]() {
      return storePush(id, pending).attach(kj::defer([slots] { slots->give(1); }));
    });
  } else {
    stored = storePush(id, pending);
  }
  if (!metrics_) return stored;
  // Observed however the push ends; the metrics outlive this VM's server.
  return stored.attach(kj::defer([metrics = metrics_, start = nowNs()] {
    metrics->pushAnswered(static_cast<double>(nowNs() - start) / 1e9);
  }));
}

kj::Promise<std::uint64_t> SyncServer::storePush(const std::string& id,
                                                 std::shared_ptr<CheckpointStore::PendingAppend> pending) {
  return inStoreOrder([this, id, pending]() -> kj::Promise<std::uint64_t> {
    return guarded([&]() -> kj::Promise<std::uint64_t> {
      if (auto stored = checkPush(id, pending->checkpoint->reader())) return *stored;
      store_.placeAppend(*pending);
      return storeCanceler_.wrap(StoreWorkers::shared().run([pending] { CheckpointStore::writeAppend(*pending); }))
          .then([this, id, pending]() {
            return guarded([&] {
              store_.commitAppend(*pending);
              recordPush(id);
              return store_.head();
            });
          });
    });
  });
}

kj::Promise<std::uint64_t> SyncServer::inStoreOrder(kj::Function<kj::Promise<std::uint64_t>()> step) {
  kj::Promise<void> previous = kj::READY_NOW;
  KJ_IF_MAYBE(tail, storeTail_) { previous = tail->addBranch(); }
  auto done = storeCanceler_.wrap(kj::mv(previous)).then(kj::mv(step)).fork();
  // The next step waits for this one, whatever its outcome, and runs even
  // when whoever asked for this one is gone.
  storeTail_ = done.addBranch().then([](std::uint64_t) {}, [](kj::Exception&&) {}).fork();
  return storeCanceler_.wrap(done.addBranch());
}

std::uint64_t SyncServer::resumablePointCreatedNs() {
  const std::uint64_t point = store_.resumablePoint();
  if (point == 0) return 0;
  if (resumableCreated_.first != point && store_.stored(point))
    resumableCreated_ = {point, store_.read(point)->reader().getCreatedUnixNs()};
  return resumableCreated_.second;
}

kj::Promise<void> SyncServer::answerPush(std::uint64_t sequence) {
  // Test hook: VMSYNC_TEST_HOLD_PUSH_ANSWER_MS=N holds every push's answer N ms
  // after the checkpoint is stored, so that a test can cut the link while the
  // answer is on its way (the device must find out on reconnecting).
  static const long holdMs = [] {
    const char* v = std::getenv("VMSYNC_TEST_HOLD_PUSH_ANSWER_MS");
    return v ? std::atol(v) : 0L;
  }();
  if (holdMs <= 0 || !timer_) return kj::READY_NOW;
  log_->warn("test hook: checkpoint {} is stored; its answer waits {} ms", sequence, holdMs);
  return timer_->afterDelay(holdMs * kj::MILLISECONDS);
}

std::uint64_t SyncServer::chainBytes() const { return store_.baseBytes() + store_.bytesAfterBase(); }

void SyncServer::fillSummary(wire::VmSummary::Builder summary) {
  summary.setName(vmId());
  summary.setUser(state_.owner);
  summary.setHeadSequence(store_.head());
  summary.setActiveDevice(state_.holder);
  summary.setParked(parked());
  summary.setChainBytes(chainBytes());
  summary.setDevices(static_cast<std::uint32_t>(devices_.size()));
}

void SyncServer::fillStatus(wire::ClusterStatus::Builder status) {
  status.setVmId(vmId());
  status.setUser(state_.owner);
  status.setHeadSequence(store_.head());
  status.setEpoch(state_.epoch);
  status.setActiveDevice(state_.holder);
  status.setStoredBytes(storedBytes_);
  status.setParked(parked());
  if (parked()) status.setParkedBy(headOrigin_);
  status.setResumablePoint(store_.resumablePoint());
  if (const std::uint64_t created = resumablePointCreatedNs(); created != 0) {
    const auto wall = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                     std::chrono::system_clock::now().time_since_epoch())
                                                     .count());
    status.setResumablePointAgeNs(wall > created ? wall - created : 0);
  }
  if (!state_.holder.empty()) status.setActiveSilentNs(holderSilentNs());
  status.setAbandoned(state_.abandonedTotal);
  auto list = status.initDevices(static_cast<unsigned>(devices_.size()));
  unsigned i = 0;
  for (const auto& [id, entry] : devices_) {
    auto d = list[i++];
    d.setDeviceId(id);
    d.setAppliedSequence(entry->applied);
    d.setActive(state_.holder == id);
    if (entry->peer && entry->sendingSequence != 0) {
      d.setSendingSequence(entry->sendingSequence);
      d.setSendingBytes(entry->sendingBytes);
      d.setSendingForNs(nowNs() - entry->sendingSinceNs);
    }
    if (!entry->peer) d.setState(wire::DeviceState::OFFLINE);
    else if (entry->applied < store_.head() && state_.holder != id) d.setState(wire::DeviceState::STALE);
    else d.setState(wire::DeviceState::ONLINE);
  }
}

}  // namespace vmsync
