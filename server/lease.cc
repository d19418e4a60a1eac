// Who may run the VM: the lease (granted, renewed, given back, fenced by a
// revocation), and the recovery at start of a pause or a switch whose outcome
// a crash or a power cut kept from being recorded.
#include <spdlog/spdlog.h>

#include <chrono>

#include "base/error.h"
#include "sync_server.h"
#include "transport/rpc_util.h"

namespace vmsync {

void SyncServer::recoverInterruptedPause() {
  if (state_.pauseIntent.empty()) return;
  const std::string intent = std::exchange(state_.pauseIntent, "");
  const bool toSwitch = intent.starts_with("switch:");
  const std::string target = toSwitch ? intent.substr(7) : std::string();
  if (state_.holder.empty() && toSwitch && parked() && state_.resumeOn.empty()) {
    // The holder gave its lease back after its final checkpoint, and the
    // server stopped before it recorded where the VM was to go.
    log_->warn("the VM was left parked at checkpoint {} by a switch to {} the server did not record; it resumes "
               "there when {} registers", store_.head(), target, target);
    state_.resumeOn = target;
  }
  persist();
  if (state_.holder.empty() || store_.head() == 0) return;
  auto head = store_.read(store_.head());
  const auto h = head->reader();
  if (h.getKind() != wire::CheckpointKind::FINAL || h.getVmContinued() || h.getOrigin() != state_.holder ||
      h.getEpoch() != state_.epoch)
    return;
  // The holder paused, its final checkpoint was stored, and the server
  // stopped before it recorded what came next. The holder either let the VM
  // go (its final was acknowledged) or resumed it (the answer was lost, and
  // it may have run on since): once back, one that runs asks for its lease
  // again. One that registers and does not, within the lease timeout, had
  // let the VM go. Until the holder is back nothing changes (a forced switch
  // still recovers a holder that is lost).
  pendingPause_ = PendingPause{state_.holder, target, lastRenewalNs_};
  log_->warn("{} had paused the VM and stored its final checkpoint {} for a {} when the server stopped; unless it "
             "asks for its lease again once back, the VM is parked there{}",
             state_.holder, store_.head(), toSwitch ? "switch" : "park",
             toSwitch ? fmt::format(" and resumed on {} when it registers", pendingPause_->target) : "");
  if (timer_) pendingPauseCheck_ = watchPendingPause().eagerlyEvaluate(nullptr);
}

kj::Promise<void> SyncServer::watchPendingPause() {
  return timer_->afterDelay(250 * kj::MILLISECONDS).then([this]() -> kj::Promise<void> {
    if (!settlePendingPause()) return watchPendingPause();
    return kj::READY_NOW;
  });
}

bool SyncServer::settlePendingPause() {
  if (!pendingPause_) return true;
  const PendingPause pause = *pendingPause_;
  if (state_.holder != pause.holder || lastRenewalNs_ != pause.since) {
    if (state_.holder == pause.holder) log_->info("{} renewed its lease: the VM runs there", pause.holder);
    pendingPause_.reset();
    return true;
  }
  auto holder = devices_.find(pause.holder);
  if (holder == devices_.end() || !holder->second->peer) return false;  // not back yet
  if (pause.backNs == 0) {
    pendingPause_->backNs = nowNs();
    return false;
  }
  if (nowNs() - pause.backNs < static_cast<std::uint64_t>(leaseTimeout_.count()) * 1000000u) return false;
  pendingPause_.reset();
  log_->warn("{} is back and did not ask for its lease within {} ms: the VM is parked at its final checkpoint {}{}",
             pause.holder, leaseTimeout_.count(), store_.head(),
             pause.target.empty() ? "" : fmt::format(", to resume on {} when it registers", pause.target));
  state_.holder.clear();
  state_.resumeOn = pause.target;
  persist();
  auto it = devices_.find(pause.target);
  if (!pause.target.empty() && it != devices_.end() && it->second->peer) resumeInterruptedSwitch(pause.target);
  return true;
}

void SyncServer::resumeInterruptedSwitch(const std::string& id) {
  if (!state_.holder.empty() || !parked() || switching_) return;
  log_->info("the VM was left parked at checkpoint {} by a switch cut short; {} is back: resuming it there",
             store_.head(), id);
  auto message = kj::heap<capnp::MallocMessageBuilder>();
  auto report = message->initRoot<wire::SwitchReport>();
  resumeParked(id, report)
      .attach(kj::mv(message))
      .detach([id, log = log_](kj::Exception&& e) { log->warn("resuming the VM on {}: {}", id, describe(e)); });
}

void SyncServer::revoked(const std::string& user, const std::string& device, const std::string& why) {
  if (state_.holder.empty() || user != state_.owner || (!device.empty() && device != state_.holder)) return;
  fenced_ = state_.holder;
  log_->warn("the active device {} was revoked ({}): it is fenced; `vmsync switch --to DEVICE --force` resumes "
             "the VM elsewhere from the newest resumable point (checkpoint {}) without waiting for the lease "
             "timeout", fenced_, why, store_.resumablePoint());
  audit({.action = "fence", .result = "done", .user = user, .device = fenced_,
         .reason = fmt::format("its credential was revoked ({}); lease epoch {}", why, state_.epoch)});
}

std::uint64_t SyncServer::acquireLease(const std::string& id) {
  // The holder asking again (back from a cut connection) keeps its lease,
  // even while a switch away from it runs: the switch takes the lease only
  // once the holder's final checkpoint is stored. Refusing it there fenced
  // the VM's only runner and left the switch nobody to hand off from.
  if (!state_.holder.empty() && state_.holder == id) {
    lastRenewalNs_ = nowNs();
    return state_.epoch;
  }
  if (switching_) fail("a switch is in progress; device {} may take the lease after it", id);
  if (!state_.holder.empty())
    fail("device {} holds the lease; switch to this device with `vmsync switch --to {}`", state_.holder, id);
  DeviceEntry& entry = device(id);
  if (entry.applied != store_.head())
    fail("device {} is stale (at sequence {}, head {}); it must catch up before it may become active", id,
         entry.applied, store_.head());
  ++state_.epoch;
  state_.holder = id;
  state_.resumeOn.clear();
  persist();
  lastRenewalNs_ = nowNs();
  log_->info("lease epoch {} granted to {}", state_.epoch, id);
  audit({.action = "lease", .result = "granted", .device = id,
         .reason = fmt::format("epoch {}, the device started the VM", state_.epoch)});
  return state_.epoch;
}

void SyncServer::renewLease(const std::string& id, std::uint64_t epoch) {
  if (state_.holder != id || state_.epoch != epoch)
    fail("lease renewal from {} refused: the device was fenced (its lease epoch is {}, the current lease is epoch {} "
         "held by '{}')", id, epoch, state_.epoch, state_.holder);
  lastRenewalNs_ = nowNs();
}

std::uint64_t SyncServer::holderSilentNs() const { return nowNs() - lastRenewalNs_; }

void SyncServer::releaseLease(const std::string& id, std::uint64_t epoch) {
  if (state_.holder != id || state_.epoch != epoch) fail("device {} does not hold lease epoch {}", id, epoch);
  state_.holder.clear();
  state_.resumeOn.clear();
  persist();
}

}  // namespace vmsync
