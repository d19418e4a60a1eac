// The server's side of moving the VM: a switch between two devices, resuming
// a parked VM, and parking it (`vmsync stop`). Split from sync_server.cc,
// which stores and forwards the chain.
#include <spdlog/spdlog.h>

#include <chrono>
#include <kj/vector.h>

#include "base/error.h"
#include "sync_server.h"
#include "transport/rpc_util.h"

namespace vmsync {

kj::Promise<void> SyncServer::catchUpForSwitch(const std::string& target, const std::string& source,
                                               wire::SwitchReport::Builder report, std::uint64_t start) {
  DeviceEntry& to = device(target);
  if (to.applied >= store_.head()) return kj::READY_NOW;
  log_->info("switch {} -> {}: {} is at checkpoint {} of {}; catching it up first", source, target, target,
             to.applied, store_.head());
  // What is already on its way counts: the switch waits for it too.
  const std::uint64_t sentBefore = to.sentBytes - (to.sendingSequence != 0 ? to.sendingBytes : 0);
  forwardUpTo(to, store_.head());
  return drained(to).then([this, target, report, start, sentBefore]() mutable {
    DeviceEntry& to = device(target);
    if (!to.peer) rpcFail(fmt::format("device {} went offline while it was caught up; the VM stays where it was", target));
    if (!to.failure.empty()) rpcFail(fmt::format("device {} cannot take over: {}", target, to.failure));
    report.setCatchUpNs(nowNs() - start);
    report.setCatchUpBytes(to.sentBytes - sentBefore);
    log_->info("switch: {} caught up to {} ({} bytes in {:.0f} ms)", target, to.applied,
               to.sentBytes - sentBefore, (nowNs() - start) / 1e6);
  });
}

kj::Promise<void> SyncServer::switchTo(const std::string& target, bool force, wire::SwitchReport::Builder report) {
  if (switching_) fail("a switch is already in progress");
  const std::string source = state_.holder;
  auto it = devices_.find(target);
  if (it == devices_.end()) fail("unknown device '{}'", target);
  if (!it->second->peer) fail("device {} is offline", target);
  if (!it->second->failure.empty()) fail("device {} cannot take over: {}", target, it->second->failure);
  if (source.empty()) {
    if (parked()) return resumeParked(target, report);
    if (force && store_.resumablePoint() != 0) return failOver(target, report);
    fail("no device runs VM '{}'{}", state_.vmId.empty() ? "(none yet)" : state_.vmId,
         store_.head() == 0 ? "; start one with `vmsync active`"
                            : " and it was not parked; `--force` resumes it from the newest resumable point");
  }
  if (target == source) fail("device {} is already active", target);
  DeviceEntry& from = device(source);
  if (!from.peer) {
    const double silent = holderSilentNs() / 1e9;
    const double timeout = leaseTimeout_.count() / 1e3;
    if (!force)
      fail("the active device {} is offline (silent for {:.1f} s), so it cannot be paused; after the lease timeout "
           "({:.0f} s) `vmsync switch --to {} --force` resumes the VM there from the newest resumable point "
           "(checkpoint {})", source, silent, timeout, target, store_.resumablePoint());
    if (silent < timeout && source != fenced_)
      fail("the active device {} was last heard from {:.1f} s ago: a forced switch waits for the lease timeout, "
           "{:.1f} s more, by when it has paused its VM by itself", source, silent, timeout - silent);
    return failOver(target, report);
  }

  return switchRunning(source, target, report);
}

kj::Promise<void> SyncServer::activateOn(const std::string& target, wire::SwitchReport::Builder report,
                                         std::uint64_t start) {
  DeviceEntry& to = device(target);
  if (!to.peer) rpcFail(fmt::format("device {} went offline", target));
  ++state_.epoch;
  state_.holder = target;
  state_.resumeOn.clear();
  persist();
  lastRenewalNs_ = nowNs();
  audit({.action = "lease", .result = "granted", .device = target,
         .reason = fmt::format("epoch {}, the device resumes the VM", state_.epoch)});
  auto activate = to.peer->activateRequest();
  activate.setEpoch(state_.epoch);
  return activate.send().then(
      [this, report, start](capnp::Response<wire::DevicePeer::ActivateResults> response) mutable {
        report.setDeviceStateLoadNs(response.getResult().getDeviceStateLoadNs());
        report.setResumeNs(response.getResult().getResumeNs());
        report.setTotalNs(nowNs() - start);
        report.setEpoch(state_.epoch);
      });
}

kj::Promise<void> SyncServer::leaveParkedIfNotResumed(const std::string& target, kj::Exception&& e,
                                                      const char* where) {
  // Nothing runs: the lease goes back, and the VM stays parked.
  if (state_.holder == target) {
    state_.holder.clear();
    persist();
  }
  rpcFail(fmt::format("resuming on {} failed: {}; the VM stays parked {}", target, describe(e), where));
}

kj::Promise<void> SyncServer::switchRunning(const std::string& source, const std::string& target,
                                            wire::SwitchReport::Builder report) {
  switching_ = true;
  const std::uint64_t start = nowNs();
  report.setFrom(source);
  report.setTo(target);
  // A stale target is brought up to date first, while the VM runs on: the
  // pause then only covers the last changes.
  return catchUpForSwitch(target, source, report, start)
      .then([this, source, target]() {
        DeviceEntry& from = device(source);
        if (!from.peer || state_.holder != source)
          rpcFail(fmt::format("the active device {} went away during the switch", source));
        log_->info("switch {} -> {}: pausing {}", source, target, source);
        state_.pauseIntent = "switch:" + target;
        persist();
        auto request = from.peer->handOffRequest();
        request.setTarget(target);
        return request.send();
      })
      .then([this, source, target, report, start](capnp::Response<wire::DevicePeer::HandOffResults> response) mutable {
        auto r = response.getResult();
        report.setFinalSequence(r.getFinalSequence());
        report.setFinalBytes(r.getFinalBytes());
        report.setPauseNs(r.getPauseNs());
        report.setFinalHarvestNs(r.getFinalHarvestNs());
        report.setDeviceStateSaveNs(r.getDeviceStateSaveNs());
        report.setDeviceStateBytes(r.getDeviceStateBytes());
        report.setDeviceStateWireBytes(r.getDeviceStateWireBytes());
        report.setPageSource(r.getPageSource());
        report.setFinalRamFullCompare(r.getFinalRamFullCompare());
        report.setFinalRamUnits(r.getFinalRamUnits());
        report.setFinalRamMissed(r.getFinalRamMissed());
        // The source paused and stored its final checkpoint: its lease ends
        // here. Should this server stop before the target is activated, the
        // parked VM resumes on the target when it registers again.
        state_.pauseIntent.clear();
        if (state_.holder == source) {
          state_.holder.clear();
          state_.resumeOn = target;
        }
        persist();
        return takeOverAfterFinal(source, target, report, start, r.getPushNs());
      })
      .attach(kj::defer([this] { switching_ = false; }));
}

kj::Promise<void> SyncServer::takeOverAfterFinal(const std::string& source, const std::string& target,
                                                 wire::SwitchReport::Builder report, std::uint64_t start,
                                                 std::uint64_t pushNs) {
  DeviceEntry& to = device(target);
  forwardUpTo(to, store_.head());
  auto activateSent = std::make_shared<bool>(false);
  return drained(to)
      .then([this, target, report, start, pushNs, activateSent]() mutable -> kj::Promise<void> {
        DeviceEntry& to = device(target);
        if (to.applied != store_.head())
          rpcFail(to.failure.empty() ? fmt::format("device {} did not apply the final checkpoint", target)
                                     : to.failure);
        report.setApplyNs(to.lastApplyNs);
        std::uint64_t wire = pushNs + to.lastForwardNs;
        report.setTransferNs(wire > to.lastApplyNs ? wire - to.lastApplyNs : 0);
        *activateSent = true;
        return activateOn(target, report, start);
      })
      .catch_([this, source, target, activateSent](kj::Exception&& e) -> kj::Promise<void> {
        if (*activateSent && e.getType() == kj::Exception::Type::DISCONNECTED) {
          // The answer was lost: the target may have resumed the VM. It keeps
          // the lease, so the VM never runs twice; if it did not resume, the
          // lease timeout and a forced switch recover it.
          const std::string why = describe(e);
          log_->warn("switch to {}: its answer was lost ({}); it keeps the lease (epoch {})", target, why,
                     state_.epoch);
          rpcFail(fmt::format("switch to {}: its answer was lost ({}); {} holds the lease: if it resumed the VM, "
                              "the VM runs there; if not, `vmsync switch --to {} --force` after the lease "
                              "timeout resumes it from the final checkpoint", target, why, target, source));
        }
        return resumeSourceAfterFailedSwitch(source, target, describe(e));
      });
}

kj::Promise<void> SyncServer::resumeSourceAfterFailedSwitch(const std::string& source, const std::string& target,
                                                            const std::string& why) {
  // The target could not take over; the source holds the exact image of the
  // final checkpoint, so the VM goes on there.
  log_->warn("switch to {} failed: {}; resuming on {}", target, why, source);
  DeviceEntry& back = device(source);
  if (!back.peer) {
    state_.holder.clear();
    state_.resumeOn = source;  // when it is back
    persist();
    rpcFail(fmt::format("switch to {} failed: {}; {} is offline, so the VM stays paused", target, why, source));
  }
  ++state_.epoch;
  state_.holder = source;
  state_.resumeOn.clear();
  persist();
  lastRenewalNs_ = nowNs();
  auto activate = back.peer->activateRequest();
  activate.setEpoch(state_.epoch);
  return activate.send().then(
      [target, source, why](auto&&) -> void {
        rpcFail(fmt::format("switch to {} failed: {}; the VM was resumed on {}", target, why, source));
      },
      [this, target, source, why](kj::Exception&& e2) -> void {
        state_.holder.clear();
        state_.resumeOn = source;  // when it is back
        persist();
        rpcFail(fmt::format("switch to {} failed: {}; resuming on {} failed too: {}", target, why, source,
                            describe(e2)));
      });
}

kj::Promise<void> SyncServer::resumeParked(const std::string& target, wire::SwitchReport::Builder report) {
  switching_ = true;
  const std::uint64_t start = nowNs();
  const std::string parker = headOrigin_;
  report.setFrom(parker);
  report.setTo(target);
  report.setFromParked(true);
  report.setFinalSequence(store_.head());
  log_->info("resuming VM '{}', parked by {} at checkpoint {}, on {}", state_.vmId, parker, store_.head(), target);
  return catchUpForSwitch(target, parker, report, start)
      .then([this, target, report, start]() mutable {
        DeviceEntry& to = device(target);
        if (to.applied != store_.head() || !to.peer)
          rpcFail(fmt::format("device {} is not at the parked checkpoint {}; the VM stays parked", target,
                              store_.head()));
        if (!state_.holder.empty())
          rpcFail(fmt::format("device {} took the lease meanwhile; the VM runs there", state_.holder));
        return activateOn(target, report, start).catch_([this, target](kj::Exception&& e) {
          return leaveParkedIfNotResumed(target, kj::mv(e), "at its final checkpoint");
        });
      })
      .attach(kj::defer([this] { switching_ = false; }));
}

kj::Promise<void> SyncServer::stop(wire::StopReport::Builder report) {
  if (switching_) fail("a switch is in progress; stop the VM after it");
  const std::string holder = state_.holder;
  if (holder.empty() && parked()) fail("VM '{}' is parked already (by {})", state_.vmId, headOrigin_);
  if (holder.empty()) fail("no device runs VM '{}'", state_.vmId.empty() ? "(none yet)" : state_.vmId);
  DeviceEntry& entry = device(holder);
  if (!entry.peer) fail("the active device {} is offline, so it cannot be paused", holder);
  switching_ = true;
  state_.pauseIntent = "park";
  persist();
  return entry.peer->parkRequest().send()
      .then([this, holder, report](capnp::Response<wire::DevicePeer::ParkResults> response) mutable {
        // The device gave the lease back itself once its final checkpoint was stored.
        state_.pauseIntent.clear();
        if (state_.holder == holder) {
          state_.holder.clear();
          state_.resumeOn.clear();  // parked on purpose
        }
        persist();
        report.setDevice(holder);
        report.setFinalSequence(response.getResult().getFinalSequence());
        report.setFinalBytes(response.getResult().getFinalBytes());
        log_->info("VM '{}' parked by {} at checkpoint {}", state_.vmId, holder, store_.head());
      })
      .attach(kj::defer([this] { switching_ = false; }));
}

std::uint64_t SyncServer::resumablePointToFailOverTo() const {
  const std::uint64_t point = store_.resumablePoint();
  if (point == 0 || !store_.stored(point))
    fail("VM '{}' has no resumable point to fail over to: no consistent checkpoint was stored", state_.vmId);
  return point;
}

kj::Promise<void> SyncServer::failOver(const std::string& target, wire::SwitchReport::Builder report) {
  resumablePointToFailOverTo();  // refused at once, before waiting for the pushes being stored
  switching_ = true;
  const std::uint64_t start = nowNs();
  // In the chain's order: a push being written when the fence comes is
  // stored first (and abandoned with what follows the point, if it is past it).
  return inStoreOrder([this, target, report]() mutable {
           return guarded([&]() -> kj::Promise<std::uint64_t> { return fenceForFailover(target, report); });
         })
      .then([this, target, report, start](std::uint64_t point) mutable {
        const std::string source = report.getFrom().cStr();
        return rollBackDevices(point)
            .then([this, target, source, report, start]() mutable {
              return catchUpForSwitch(target, source, report, start);
            })
            .then([this, target, report, start]() mutable {
              DeviceEntry& to = device(target);
              if (to.applied != store_.head() || !to.peer)
                rpcFail(fmt::format("device {} did not reach the resumable point {}; the VM stays parked there",
                                    target, store_.head()));
              return activateOn(target, report, start).catch_([this, target](kj::Exception&& e) {
                return leaveParkedIfNotResumed(target, kj::mv(e), "at the resumable point");
              });
            });
      })
      .attach(kj::defer([this] { switching_ = false; }));
}

std::uint64_t SyncServer::fenceForFailover(const std::string& target, wire::SwitchReport::Builder report) {
  // Again: a final checkpoint stored while the fence waited is the newer point.
  const std::uint64_t point = resumablePointToFailOverTo();
  const std::string source = state_.holder;
  // Fence first: a new epoch nobody holds yet, durable before anything moves.
  ++state_.epoch;
  state_.holder.clear();
  state_.resumeOn.clear();
  const std::uint64_t oldHead = store_.head();
  // The failover is recorded with the fence, before anything moves: a crash
  // (or a power cut) before the move is complete is finished at the next
  // start, and an acknowledged checkpoint is never out of the chain without
  // a recorded failover that abandoned it.
  state_.abandonedAfter = point;
  state_.abandonedUpTo = std::max(state_.abandonedUpTo, oldHead);
  state_.failovers.emplace_back(point, state_.epoch);
  persist();
  const std::uint64_t abandoned = store_.abandonAfter(point, state_.epoch);
  state_.abandonedTotal += abandoned;
  auto stored = store_.read(point);
  noteHead(stored->reader());
  const std::uint64_t created = stored->reader().getCreatedUnixNs();
  for (auto& [id, entry] : devices_) entry->queued = std::min(entry->queued, std::max(entry->applied, point));
  persist();
  const auto wall = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
  const std::uint64_t lost = created != 0 && wall > created ? wall - created : 0;
  log_->warn("failover of VM '{}' from {} to {}: resuming from checkpoint {} ({:.1f} s of guest time lost); "
             "checkpoints {}..{} abandoned ({} kept under abandoned/), lease epoch {}",
             state_.vmId, source.empty() ? "(none)" : source, target, point, lost / 1e9, point + 1, oldHead,
             abandoned, state_.epoch);
  audit({.action = "fence", .result = "done", .device = source,
         .reason = fmt::format("failover to {}: lease epoch {}; checkpoints {}..{} abandoned", target, state_.epoch,
                               point + 1, oldHead)});
  report.setFrom(source);
  report.setTo(target);
  report.setForced(true);
  report.setFinalSequence(point);
  report.setLostNs(lost);
  report.setAbandonedCheckpoints(oldHead - point);
  return point;
}

}  // namespace vmsync
