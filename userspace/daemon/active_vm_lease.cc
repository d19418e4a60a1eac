// What keeps the active VM safe when its device or its link is lost: the
// lease renewals (and the pause when they fail), resumable points for a
// failover, fencing, and rejoining after a reconnection. Split from
// active_vm.cc, which runs the VMM and the checkpoint loop.
#include <spdlog/spdlog.h>

#include "base/error.h"
#include "checkpoint/checkpoint_identity.h"
#include "checkpoint/device_state_codec.h"
#include "daemon/active_vm.h"
#include "transport/rpc_util.h"

namespace vmsync {

namespace {

kj::ArrayPtr<const kj::byte> asCapnp(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()};
}

}  // namespace

void ActiveVm::leaseRenewed() {
  lastRenewedNs_ = nowNs();
  if (selfPaused_ && !fenced_ && !pausedForHandOff_ && vm_) {
    vm_->cont();
    selfPaused_ = false;
    spdlog::info("{}: the server confirmed the lease again (epoch {}); the VM runs on", options_.deviceId, epoch_);
  }
}

kj::Promise<void> ActiveVm::renewLoop() {
  const auto timeout = link_.leaseTimeout();
  const auto period = std::max<std::int64_t>(timeout.count() / 4, 100);
  return io_.provider->getTimer().afterDelay(period * kj::MILLISECONDS).then([this, timeout]() -> kj::Promise<void> {
    if (fenced_) return kj::READY_NOW;
    const std::uint64_t silentNs = nowNs() - lastRenewedNs_;
    if (!selfPaused_ && !pausedForHandOff_ && vm_ &&
        silentNs > static_cast<std::uint64_t>(timeout.count()) * 1000000) {
      // The server may fail the VM over to another device after this long:
      // it must not run here meanwhile.
      vm_->stop();
      selfPaused_ = true;
      spdlog::warn("{}: the lease could not be renewed for {:.1f} s (the server's lease timeout); the VM is paused "
                   "until the server confirms the lease", options_.deviceId, silentNs / 1e9);
    }
    kj::Promise<void> renewal = kj::READY_NOW;
    if (link_.connected()) {
      auto request = link_.session().renewLeaseRequest();
      request.setEpoch(epoch_);
      renewal = request.send().then([this](auto&&) { leaseRenewed(); },
                                    [this](kj::Exception&& e) {
                                      const std::string why = describe(e);
                                      if (why.find("was fenced") != std::string::npos) fence(why);
                                    });
    }
    return renewal.then([this] { return renewLoop(); });
  });
}

void ActiveVm::fence(const std::string& why) {
  stopping_ = true;
  timer_ = nullptr;
  if (!fenced_ && vm_) {
    try {
      vm_->stop();
    } catch (const Error& e) {
      // The VMM is gone or not answering: it runs no guest either way.
      spdlog::error("{}: cannot pause the VM: {}", options_.deviceId, e.what());
    }
  }
  fenced_ = true;
  spdlog::error("{}: fenced: {}; the VM is paused here and stays paused (it is never resumed on its own)",
                options_.deviceId, why);
}

kj::Promise<void> ActiveVm::pushResumablePoint() {
  if (!link_.connected()) return kj::READY_NOW;
  lastResumableNs_ = nowNs();
  auto pending = std::make_shared<PendingPush>();
  auto state = std::make_shared<std::vector<std::byte>>();
  const std::uint64_t t0 = nowNs();
  vm_->stop();
  // Under the pause only what must be exact: which units changed, and a copy
  // of each. They are encoded once the VM runs again.
  *pending = harvestEverything(/*encodeNow=*/false);
  const std::uint64_t t1 = nowNs();
  try {
    *state = vm_->saveDeviceState();
  } catch (const Error& e) {
    ramTracker_->retryLater(pending->memory);
    diskTracker_->retryLater(pending->disk);
    vm_->cont();
    spdlog::error("{}: no resumable point: {}; its changes go into the next checkpoint", options_.deviceId, e.what());
    return kj::READY_NOW;
  }
  // QEMU's save turned KVM's dirty logging on for itself and turns it off
  // again when the VM runs (QEMU 7.2 postpones that to the start): with the
  // kmod source the next harvest then rescans. A re-arm here, while paused,
  // would come before that and change nothing.
  vm_->cont();
  const std::uint64_t t2 = nowNs();
  ramTracker_->encode(pending->memory);
  diskTracker_->encode(pending->disk);
  const std::uint64_t t3 = nowNs();
  spdlog::info("{}: resumable point {}: VM paused {:.1f} ms (copy of {} pages and {} blocks {:.1f} ms, device state "
               "{:.1f} ms); encoded after it in {:.1f} ms",
               options_.deviceId, pending->sequence, (t2 - t0) / 1e6, pending->memory.units.size(),
               pending->disk.units.size(), (t1 - t0) / 1e6, (t2 - t1) / 1e6, (t3 - t2) / 1e6);
  const Digest digest = imageDigest(ramTracker_->hashesAfter(pending->memory), diskTracker_->hashesAfter(pending->disk));
  auto request = link_.session().pushRequest();
  auto checkpoint = request.initCheckpoint();
  describeCheckpoint(checkpoint, wire::CheckpointKind::FINAL, pending->sequence);
  toWire(pending->memory, pending->disk, checkpoint);
  link_.holdWhileSending(pending);
  setDeviceState(checkpoint, *state);
  checkpoint.setImageDigest(asCapnp(digest));
  checkpoint.setVmContinued(true);
  pending->identity = describeIdentity(checkpoint.asReader());
  const std::uint64_t wireBytes = request.totalSize().wordCount * sizeof(capnp::word);
  auto progress =
      link_.watchTransfer(fmt::format("{}: resumable point {}", options_.deviceId, pending->sequence), wireBytes);
  const std::uint64_t sendStart = pending->sentNs = nowNs();
  return request.send()
      .attach(kj::mv(progress), kj::mv(state))
      .then(
          [this, pending, wireBytes, t0, t2, sendStart](capnp::Response<wire::DeviceSession::PushResults>) {
            onPushStored(*pending, wire::CheckpointKind::FINAL, wireBytes, 0, t2 - t0, sendStart);
            link_.sent(pending);
          },
          [this, pending](kj::Exception&& e) { onPushFailed(pending, e); })
      .eagerlyEvaluate(nullptr);
}

kj::Promise<void> ActiveVm::rejoin(Registration registered) {
  // A push whose answer was lost may have been stored: only this device
  // pushes under its lease, so a head one past ours is that push.
  const std::uint64_t head = registered.getHeadSequence();
  auto unconfirmed = link_.takeUnconfirmed();
  if (unconfirmed && head == unconfirmed->sequence) {
    ramTracker_->acknowledge(unconfirmed->memory);
    diskTracker_->acknowledge(unconfirmed->disk);
    replica_.saveApplied(head, epoch_);
    spdlog::info("{}: checkpoint {} had reached the server before the connection broke, {}", options_.deviceId,
                 head, unconfirmed->identity);
  }
  if (head != replica_.applied()) {
    // Another device pushed after this one: it runs the VM now.
    const std::string why =
        fmt::format("the server's chain ends at {} but this active device is at {}", head, replica_.applied());
    fence(why);
    fail("{}; not pushing", why);
  }
  auto session = link_.session();
  return session.acquireLeaseRequest().send().then(
      [this, session](capnp::Response<wire::DeviceSession::AcquireLeaseResults> lease) mutable -> kj::Promise<void> {
        if (lease.getEpoch() == epoch_) return kj::READY_NOW;
        // Granted anew: the lease had ended (a switch took it away while this
        // device was cut off). The VM stops here; the lease goes back.
        const std::string why = fmt::format("the lease moved on (epoch {} -> {}) while this device was cut off",
                                            epoch_, lease.getEpoch());
        fence(why);
        auto release = session.releaseLeaseRequest();
        release.setEpoch(lease.getEpoch());
        return release.send().ignoreResult().then([why]() -> void { rpcFail(why + "; it stops pushing"); });
      },
      [this](kj::Exception&& e) -> kj::Promise<void> {
        // Another device holds the lease, or is being given it.
        const std::string why = "the server refuses this device the lease (" + describe(e) + ")";
        fence(why);
        rpcFail(why + "; it stops pushing");
      });
}

}  // namespace vmsync
