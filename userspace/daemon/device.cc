#include "daemon/device.h"

#include <signal.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <kj/async-unix.h>
#include <memory>

#include "base/error.h"
#include "daemon/active_vm.h"
#include "daemon/replica.h"
#include "daemon/server_link.h"
#include "transport/rpc_util.h"
#include "vmsync.capnp.h"

namespace vmsync {

namespace fs = std::filesystem;

/// One device: coordinates its role between the replica, the server link and
/// the active VM.
class Device {
 public:
  Device(kj::AsyncIoContext& io, DeviceOptions options);
  ~Device();

  /// Connects, registers and, for the active role, creates and starts the VM.
  kj::Promise<void> start(Role role);

  // DevicePeer calls from the server.
  void apply(wire::Checkpoint::Reader checkpoint, wire::DevicePeer::ApplyResults::Builder results);
  kj::Promise<void> handOff(std::string target, wire::HandOffResult::Builder result);
  void activate(std::uint64_t epoch, wire::ActivateResult::Builder result);

 private:
  /// Throws Error when --image lacks a file the VM needs.
  void checkImage() const;
  /// Creates the VM from --image under lease `epoch`, boots it and starts shipping checkpoints.
  void createAndRun(std::uint64_t epoch);
  kj::Promise<void> becomeActiveAsNewVm(Registration registered);
  /// Back to standby after a stored final checkpoint: the VMM quits in the background.
  void becomeStandby(FinalCheckpoint final);
  /// Quits a VMM that handed off, if it has not quit yet.
  void retireVm();

  kj::AsyncIoContext& io_;
  DeviceOptions options_;
  Role role_ = Role::standby;
  Replica replica_;
  ServerLink link_;
  std::unique_ptr<ActiveVm> active_;  // while active
  RetiredVmm retiring_;               // paused after a handoff, quitting in the background

  class LogTaskErrors final : public kj::TaskSet::ErrorHandler {
   public:
    void taskFailed(kj::Exception&& e) override { spdlog::warn("background task: {}", describe(e)); }
  };
  LogTaskErrors taskErrors_;
  kj::TaskSet background_{taskErrors_};  // work left for after an answer
};

class DevicePeerImpl final : public wire::DevicePeer::Server {
 public:
  explicit DevicePeerImpl(Device& device) : device_(device) {}

  kj::Promise<void> apply(ApplyContext context) override {
    return guarded([&] {
      device_.apply(context.getParams().getCheckpoint(), context.getResults());
      return kj::READY_NOW;
    });
  }
  kj::Promise<void> handOff(HandOffContext context) override {
    return guarded([&] { return device_.handOff(context.getParams().getTarget(), context.getResults().initResult()); });
  }
  kj::Promise<void> activate(ActivateContext context) override {
    return guarded([&] {
      device_.activate(context.getParams().getEpoch(), context.getResults().initResult());
      return kj::READY_NOW;
    });
  }

 private:
  Device& device_;
};

Device::Device(kj::AsyncIoContext& io, DeviceOptions options)
    : io_(io),
      options_(std::move(options)),
      replica_(options_.stateDir, options_.deviceId),
      link_(
          io_, options_, [this]() -> wire::DevicePeer::Client { return kj::heap<DevicePeerImpl>(*this); },
          [this] { return replica_.applied(); }) {
  link_.onReconnected([this](Registration registered) -> kj::Promise<void> {
    if (role_ != Role::active || !active_) return kj::READY_NOW;
    return active_->rejoin(kj::mv(registered));
  });
}

Device::~Device() {
  retireVm();
  active_.reset();
}

void Device::checkImage() const {
  if (options_.imageDir.empty()) fail("`vmsync active` needs --image DIR (built by vm-images/build.sh)");
  const fs::path image(options_.imageDir);
  for (const char* name : {"vmlinuz", "initrd.img", "disk.img", "cmdline"})
    if (!fs::exists(image / name)) fail("guest image {} has no {}; build it with vm-images/build.sh", image.string(), name);
}

kj::Promise<void> Device::start(Role role) {
  if (role == Role::active) checkImage();  // before taking the lease
  // A new VM's device registers at 0: its state directory is about to be replaced.
  return link_.connect(role == Role::active ? 0 : replica_.applied()).then([this, role](Registration registered) -> kj::Promise<void> {
    if (role == Role::standby) return kj::READY_NOW;
    return becomeActiveAsNewVm(kj::mv(registered));
  });
}

kj::Promise<void> Device::becomeActiveAsNewVm(Registration registered) {
  if (registered.getHeadSequence() != 0)
    fail("the server already holds VM '{}' at checkpoint {}; start this device with `vmsync standby` and "
         "switch to it", std::string(registered.getVmId()), registered.getHeadSequence());
  return link_.session().acquireLeaseRequest().send().then(
      [this](capnp::Response<wire::DeviceSession::AcquireLeaseResults> lease) -> kj::Promise<void> {
        try {
          createAndRun(lease.getEpoch());
          return kj::READY_NOW;
        } catch (const Error& e) {
          // Nothing runs here: give the lease back before saying why.
          std::string why = e.what();
          active_.reset();
          role_ = Role::standby;
          auto release = link_.session().releaseLeaseRequest();
          release.setEpoch(lease.getEpoch());
          return release.send().then([why](auto&&) -> void { rpcFail(why); },
                                     [why](kj::Exception&&) -> void { rpcFail(why); });
        }
      });
}

void Device::createAndRun(std::uint64_t epoch) {
  replica_.createFromImage(options_.imageDir, options_.vmId, options_.memoryMb, parsePolicy(options_.policy));
  replica_.setAccel(resolveAccel(options_.accel, vmConfigFor(options_, replica_, nullptr, false)));
  ImageHashes zeros{std::vector<std::uint64_t>(replica_.ram().units(), zeroUnitHash()),
                    std::vector<std::uint64_t>(replica_.disk().units(), zeroUnitHash())};
  role_ = Role::active;
  active_ = std::make_unique<ActiveVm>(io_, options_, replica_, link_, epoch, std::move(zeros));
  active_->boot();
}

void Device::apply(wire::Checkpoint::Reader checkpoint, wire::DevicePeer::ApplyResults::Builder results) {
  const std::uint64_t start = nowNs();
  if (role_ != Role::standby) fail("device {} is active; it does not apply checkpoints", options_.deviceId);
  std::uint64_t journaled = 0;
  ApplyStats stats = replica_.apply(checkpoint, &journaled);
  results.setAppliedSequence(checkpoint.getSequence());
  results.setApplyNs(nowNs() - start);
  spdlog::info("{}: applied checkpoint {} ({} pages, {} blocks; journal {:.1f} ms, image {:.1f} ms)",
               options_.deviceId, checkpoint.getSequence(), stats.memoryUnits, stats.diskUnits,
               (journaled - start) / 1e6, (nowNs() - journaled) / 1e6);
}

kj::Promise<void> Device::handOff(std::string target, wire::HandOffResult::Builder result) {
  if (role_ != Role::active || !active_) fail("device {} is not active", options_.deviceId);
  return active_->handOff(kj::mv(target), result).then([this](FinalCheckpoint final) {
    becomeStandby(kj::mv(final));
  });
}

void Device::becomeStandby(FinalCheckpoint final) {
  retiring_ = active_->retire();
  active_.reset();
  role_ = Role::standby;
  replica_.recordFinal(final.sequence, final.deviceState, std::move(final.hashes));
  // The paused VMM writes nothing more; it quits after the answer is on its way.
  background_.add(io_.provider->getTimer().afterDelay(200 * kj::MILLISECONDS).then([this] {
    retireVm();
    // The VMM's faults cached the images in large folios; a standby writes
    // them a unit at a time.
    if (role_ == Role::standby) replica_.recacheImages();
  }));
  spdlog::info("{}: now a standby at checkpoint {}", options_.deviceId, final.sequence);
}

void Device::retireVm() { retiring_.quit(); }

void Device::activate(std::uint64_t epoch, wire::ActivateResult::Builder result) {
  if (role_ != Role::standby) fail("device {} is already active", options_.deviceId);
  retireVm();  // a VMM that handed off from here must be gone before another uses the image
  std::string state = replica_.deviceStateForResume();
  // Trackers first: Diff Prev copies the image as its reference, and that copy
  // must be the final checkpoint's image, taken before the guest runs again.
  auto active = std::make_unique<ActiveVm>(io_, options_, replica_, link_, epoch, replica_.takeVerifiedHashes());
  active->resume({reinterpret_cast<const std::byte*>(state.data()), state.size()}, result);
  active_ = std::move(active);
  role_ = Role::active;
}

int runDevice(const DeviceOptions& options, Role initialRole) {
  try {
    if (options.deviceId.empty()) fail("--device is required");
    if (options.stateDir.empty()) fail("--state is required");
    if (options.intervalSeconds <= 0) fail("--interval must be positive, not {}", options.intervalSeconds);
    kj::UnixEventPort::captureSignal(SIGTERM);
    kj::UnixEventPort::captureSignal(SIGINT);
    auto io = kj::setupAsyncIo();
    Device device(io, options);
    device.start(initialRole).wait(io.waitScope);
    auto stop = io.unixEventPort.onSignal(SIGTERM).exclusiveJoin(io.unixEventPort.onSignal(SIGINT));
    stop.wait(io.waitScope);
    spdlog::info("{}: stopping", options.deviceId);
    return 0;
  } catch (const Error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const kj::Exception& e) {
    spdlog::error("{}", describe(e));
    return 1;
  }
}

}  // namespace vmsync
