#include "daemon/device.h"


#include <signal.h>
#include <sys/stat.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <filesystem>
#include <kj/async-unix.h>
#include <memory>
#include <string>

#include <capnp/message.h>

#include "base/error.h"
#include "base/metrics.h"
#include "base/service_notify.h"
#include "base/version.h"
#include "daemon/active_vm.h"
#include "daemon/device_metrics.h"
#include "daemon/replica.h"
#include "daemon/server_link.h"
#include "transport/rpc_util.h"
#include "transport/secure_channel.h"
#include "vmsync.capnp.h"

namespace vmsync {

namespace fs = std::filesystem;

/// One device: coordinates its role between the replica, the server link and
/// the active VM.
class Device {
 public:
  Device(kj::AsyncIoContext& io, DeviceOptions options);
  ~Device();

  /// Connects, registers and, for the active role, creates and starts the
  /// VM, or resumes it where it was parked.
  kj::Promise<void> start(Role role);
  /// True while this device runs (or holds, paused by fencing) the VM.
  bool active() const { return role_ == Role::active && active_ != nullptr; }
  /// Resolves when the server asked this daemon to exit (`vmsync stop`).
  kj::Promise<void> exitRequested() { return exitRequested_.addBranch(); }

  // DevicePeer calls from the server.
  void apply(wire::Checkpoint::Reader checkpoint, wire::DevicePeer::ApplyResults::Builder results);
  kj::Promise<void> handOff(std::string target, wire::HandOffResult::Builder result);
  void activate(std::uint64_t epoch, wire::ActivateResult::Builder result);
  /// Resolves when the answer to an activate may go. Under the test hook
  /// VMSYNC_TEST_LOSE_ACTIVATE_ANSWER=1 the first answer is lost instead:
  /// the connection drops after the VM resumed, before the server hears.
  kj::Promise<void> answerActivate();
  /// Pauses the VM, pushes a final checkpoint and gives the lease back: the
  /// VM is parked on the server, and this device is a standby at it.
  kj::Promise<void> park(wire::HandOffResult::Builder result);
  /// park(), then the daemon exits (the server's `stop`).
  kj::Promise<void> parkAndExit(wire::HandOffResult::Builder result);
  /// The server could not resync this device: it drops its image and starts
  /// over from 0 (its VM, if it still had one, stays paused and goes).
  /// Returns the sequence its image is at now.
  std::uint64_t rollBack(std::uint64_t to, const std::string& why);
  /// The server's resync: takes the image back to the chain. Returns the
  /// sequence it is at now.
  std::uint64_t resync(wire::Checkpoint::Reader checkpoint);
  /// The hash of every unit of the image, for the server to build a resync.
  void unitHashes(wire::DevicePeer::UnitHashesResults::Builder results);

 private:
  /// The server holds a parked VM at `head`: resume it here, once this
  /// device's image is at the parked checkpoint.
  kj::Promise<void> resumeParkedHere(std::uint64_t head);
  kj::Promise<void> whenApplied(std::uint64_t sequence, std::uint64_t waitedMs);
  /// The standby's background check of its image against the hashes kept on
  /// apply: a few units at a time on the event loop (so never beside an
  /// apply), one pass every scrubEverySeconds. Damage found makes the image
  /// diverged, and the device registers again for the server's resync.
  kj::Promise<void> scrubLoop();
  /// Throws Error when --image lacks a file the VM needs.
  void checkImage() const;
  /// Creates the VM from --image under lease `epoch`, boots it and starts shipping checkpoints.
  void createAndRun(std::uint64_t epoch);
  kj::Promise<void> becomeActiveAsNewVm();
  /// Back to standby after a stored final checkpoint: the VMM quits in the background.
  void becomeStandby(FinalCheckpoint final);
  /// Quits a VMM that handed off, if it has not quit yet.
  void retireVm();
  /// Lost the lease (fenced, or resynced by the server): the VM, paused,
  /// never runs here again; the image, which it took past the last
  /// checkpoint, is diverged. A standby from now on.
  void leaveActive(const std::string& why);
  /// Where the image is on the chain, to register with.
  ChainPosition position() const {
    return ChainPosition{replica_.applied(), replica_.appliedEpoch(), replica_.diverged()};
  }

  kj::AsyncIoContext& io_;
  DeviceOptions options_;
  Role role_ = Role::standby;
  Replica replica_;
  ServerLink link_;
  std::shared_ptr<DeviceMetrics> metrics_;            // before active_, which counts into it
  std::unique_ptr<MetricsEndpoint> metricsEndpoint_;  // with --metrics-listen
  std::unique_ptr<ActiveVm> active_;  // while active
  RetiredVmm retiring_;               // paused after a handoff, quitting in the background
  kj::PromiseFulfillerPair<void> exit_ = kj::newPromiseAndFulfiller<void>();
  kj::ForkedPromise<void> exitRequested_ = exit_.promise.fork();

  class LogTaskErrors final : public kj::TaskSet::ErrorHandler {
   public:
    void taskFailed(kj::Exception&& e) override { spdlog::warn("background task: {}", describe(e)); }
  };
  LogTaskErrors taskErrors_;
  kj::TaskSet background_{taskErrors_};  // work left for after an answer
  kj::Maybe<kj::Promise<void>> scrub_;
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
    return guarded([&]() -> kj::Promise<void> {
      device_.activate(context.getParams().getEpoch(), context.getResults().initResult());
      return device_.answerActivate();
    });
  }
  kj::Promise<void> ping(PingContext) override { return kj::READY_NOW; }
  kj::Promise<void> rollBack(RollBackContext context) override {
    return guarded([&] {
      auto params = context.getParams();
      context.getResults().setAppliedSequence(
          params.hasResync() ? device_.resync(params.getResync())
                             : device_.rollBack(params.getTo(), "the server could not resync its image"));
      return kj::READY_NOW;
    });
  }
  kj::Promise<void> unitHashes(UnitHashesContext context) override {
    return guarded([&] {
      device_.unitHashes(context.getResults());
      return kj::READY_NOW;
    });
  }
  kj::Promise<void> park(ParkContext context) override {
    return guarded([&] { return device_.parkAndExit(context.getResults().initResult()); });
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
          [this] { return position(); }) {
  // One state directory per VM: it keeps the name of the VM it holds.
  const std::string& held = replica_.spec().vmId;
  if (options_.vmId.empty()) {
    options_.vmId = held.empty() ? "vm" : held;
  } else if (!held.empty() && held != options_.vmId) {
    fail("state directory {} holds VM '{}', not '{}': give --vm {} to go on with it, or another --state "
         "directory for VM '{}' (one per VM)", options_.stateDir, held, options_.vmId, held, options_.vmId);
  }
  checkName("VM name", options_.vmId);
  spdlog::info("{}: vmsync {} (commit {}), VM '{}'", options_.deviceId, buildVersion(), buildCommit(), options_.vmId);
  metrics_ = std::make_shared<DeviceMetrics>(options_.vmId, options_.deviceId);
  metrics_->position(replica_.applied());
  if (!options_.metricsListen.empty()) {
    metricsEndpoint_ = std::make_unique<MetricsEndpoint>(options_.metricsListen);
    metricsEndpoint_->serve(metrics_->registry());
    spdlog::info("{}: metrics served on {} (port {}) at /metrics", options_.deviceId, options_.metricsListen,
                 metricsEndpoint_->port());
  }
  replica_.setFullVerify(options_.fullVerify);
  if (options_.scrubEverySeconds > 0)
    scrub_ = scrubLoop().eagerlyEvaluate([](kj::Exception&& e) { spdlog::error("image check: {}", describe(e)); });
  link_.onReconnected([this](Registration registered) -> kj::Promise<void> {
    if (role_ != Role::active || !active_) return kj::READY_NOW;
    return active_->rejoin(kj::mv(registered)).catch_([this](kj::Exception&& e) -> kj::Promise<void> {
      // The server's resync came first (it saw this device's checkpoints abandoned).
      if (!active_) return kj::READY_NOW;
      if (!active_->fenced()) return kj::mv(e);
      // Another device runs the VM: this one's image went on past the chain.
      // It registers again as a standby whose image diverged, which the
      // server resyncs.
      leaveActive(describe(e));
      background_.add(kj::evalLater([this] { link_.restart(); }));
      return kj::READY_NOW;
    });
  });
}

void Device::leaveActive(const std::string& why) {
  if (!active_) return;
  // Lost its lease: the VM never runs here again as it is.
  active_->fence(why);
  retiring_ = active_->retire();
  active_.reset();
  retireVm();
  role_ = Role::standby;
  metrics_->role(false, 0);
  replica_.markDiverged();
  replica_.markLive(false);
  spdlog::info("{}: a standby now ({}); its image waits for the server's resync", options_.deviceId, why);
}

std::uint64_t Device::rollBack(std::uint64_t to, const std::string& why) {
  leaveActive(why);
  role_ = Role::standby;
  if (replica_.applied() > to || to == 0) replica_.discard();
  replica_.markLive(false);
  spdlog::info("{}: rolled back ({}); a standby at checkpoint {}", options_.deviceId, why, replica_.applied());
  return replica_.applied();
}

void Device::unitHashes(wire::DevicePeer::UnitHashesResults::Builder results) {
  leaveActive("the server resyncs this device");
  const std::uint64_t start = nowNs();
  ImageHashes hashes = replica_.currentHashes();
  results.setAppliedSequence(replica_.applied());
  auto ram = results.initRam(static_cast<unsigned>(hashes.ram.size()));
  for (unsigned i = 0; i < hashes.ram.size(); ++i) ram.set(i, hashes.ram[i]);
  auto disk = results.initDisk(static_cast<unsigned>(hashes.disk.size()));
  for (unsigned i = 0; i < hashes.disk.size(); ++i) disk.set(i, hashes.disk[i]);
  spdlog::info("{}: image at checkpoint {}{}: hashes of {} pages and {} blocks sent for a resync ({:.0f} ms)",
               options_.deviceId, replica_.applied(), replica_.diverged() ? " and past it" : "", hashes.ram.size(),
               hashes.disk.size(), (nowNs() - start) / 1e6);
}

std::uint64_t Device::resync(wire::Checkpoint::Reader checkpoint) {
  leaveActive("the server resyncs this device");
  const std::uint64_t from = replica_.applied();
  const std::uint64_t start = nowNs();
  ApplyStats stats = replica_.resync(checkpoint);
  spdlog::info("{}: resynced from checkpoint {} to the chain's checkpoint {}: {} pages and {} blocks replaced "
               "({:.0f} ms){}", options_.deviceId, from, replica_.applied(), stats.memoryUnits, stats.diskUnits,
               (nowNs() - start) / 1e6, replica_.resumable() ? "; its image digest matches" : "");
  return replica_.applied();
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
  // A server that cannot be reached yet (not started, a link down, an answer
  // that came too late) is waited for; a refusal ends the daemon.
  if (role == Role::standby) return link_.connectWhenReachable([this] { return position(); }).ignoreResult();
  // An image that can resume, or that the server must resync, registers
  // where it is; otherwise at 0, since a new VM's state directory is about to
  // be replaced.
  return link_
      .connectWhenReachable(
          [this] { return replica_.resumable() || replica_.diverged() ? position() : ChainPosition{}; })
      .then([this](Registration registered) -> kj::Promise<void> {
        const std::uint64_t head = registered.getHeadSequence();
        if (head == 0) return becomeActiveAsNewVm();
        if (registered.getParked()) return resumeParkedHere(head);
        fail("the server already holds VM '{}' at checkpoint {} and another device runs it; start this device "
             "with `vmsync standby` and switch to it", std::string(registered.getVmId()), head);
      });
}

kj::Promise<void> Device::resumeParkedHere(std::uint64_t head) {
  spdlog::info("{}: VM '{}' is parked at checkpoint {}; this device is at {}{}", options_.deviceId, replica_.spec().vmId,
               head, replica_.applied(), replica_.applied() < head ? ": catching up first" : "");
  return whenApplied(head, 0).then([this, head]() {
    if (!replica_.resumable() || replica_.applied() != head)
      fail("device {} cannot resume the parked VM: its image is at checkpoint {} without device state for it",
           options_.deviceId, replica_.applied());
    return link_.session().acquireLeaseRequest().send();
  }).then([this](capnp::Response<wire::DeviceSession::AcquireLeaseResults> lease) -> kj::Promise<void> {
    capnp::MallocMessageBuilder timings;
    try {
      activate(lease.getEpoch(), timings.initRoot<wire::ActivateResult>());
      return kj::READY_NOW;
    } catch (const std::exception& e) {
      // Nothing runs here: give the lease back before saying why.
      std::string why = e.what();
      auto release = link_.session().releaseLeaseRequest();
      release.setEpoch(lease.getEpoch());
      return release.send().then([why](auto&&) -> void { rpcFail(why); },
                                 [why](kj::Exception&&) -> void { rpcFail(why); });
    }
  });
}

kj::Promise<void> Device::scrubLoop() {
  // 1 MiB every 10 ms: a pass over a 512 MiB image takes about 5 s of loop
  // turns, each short enough not to delay an apply or a switch.
  constexpr std::uint64_t kUnitsPerStep = 256;
  constexpr auto kStep = 10 * kj::MILLISECONDS;
  const std::uint64_t passes = replica_.scrubPasses();
  bool working = false;
  if (role_ == Role::standby && replica_.hashesKept()) {
    working = true;
    if (!replica_.scrubStep(kUnitsPerStep).empty()) {
      working = false;
      background_.add(kj::evalLater([this] { link_.restart(); }));
    }
  }
  const bool passDone = replica_.scrubPasses() != passes;
  if (passDone) spdlog::debug("{}: image check: pass {} found nothing wrong", options_.deviceId, replica_.scrubPasses());
  const auto pause = static_cast<std::int64_t>(options_.scrubEverySeconds * 1000) * kj::MILLISECONDS;
  return io_.provider->getTimer().afterDelay(working && !passDone ? kStep : pause).then([this] { return scrubLoop(); });
}

kj::Promise<void> Device::whenApplied(std::uint64_t sequence, std::uint64_t waitedMs) {
  // A diverged image (or one past the chain) is at `sequence` only after the server's resync.
  if (replica_.applied() == sequence && !replica_.diverged()) return kj::READY_NOW;
  if (waitedMs > 0 && waitedMs % 10000 == 0)
    spdlog::info("{}: still catching up: at checkpoint {} of {}", options_.deviceId, replica_.applied(), sequence);
  return io_.provider->getTimer().afterDelay(100 * kj::MILLISECONDS).then([this, sequence, waitedMs] {
    return whenApplied(sequence, waitedMs + 100);
  });
}

kj::Promise<void> Device::becomeActiveAsNewVm() {
  checkImage();  // before taking the lease
  return link_.session().acquireLeaseRequest().send().then(
      [this](capnp::Response<wire::DeviceSession::AcquireLeaseResults> lease) -> kj::Promise<void> {
        try {
          createAndRun(lease.getEpoch());
          return kj::READY_NOW;
        } catch (const std::exception& e) {
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
  active_ = std::make_unique<ActiveVm>(io_, options_, replica_, link_, epoch, std::move(zeros), *metrics_);
  active_->boot();
}

void Device::apply(wire::Checkpoint::Reader checkpoint, wire::DevicePeer::ApplyResults::Builder results) {
  const std::uint64_t start = nowNs();
  if (role_ != Role::standby) fail("device {} is active; it does not apply checkpoints", options_.deviceId);
  std::uint64_t journaled = 0;
  ApplyStats stats;
  try {
    stats = replica_.apply(checkpoint, &journaled);
  } catch (const ReferenceMismatch&) {
    // The image is diverged now (the replica marked it): registering again
    // has the server resync it, which sends the units it lacks.
    background_.add(kj::evalLater([this] { link_.restart(); }));
    throw;
  }
  // The kept unit hashes, made once after the answer has gone: later applies
  // and a switch's digest check then cost what they write.
  if (!replica_.hashesKept())
    background_.add(kj::evalLater([this] {
      if (role_ == Role::standby) replica_.ensureHashes();
    }));
  results.setAppliedSequence(checkpoint.getSequence());
  results.setApplyNs(nowNs() - start);
  metrics_->applied((nowNs() - start) / 1e9);
  metrics_->position(checkpoint.getSequence());
  spdlog::info("{}: applied checkpoint {} ({} pages, {} blocks{}; journal {:.1f} ms, image {:.1f} ms)",
               options_.deviceId, checkpoint.getSequence(), stats.memoryUnits, stats.diskUnits,
               stats.referenceUnits ? fmt::format(", {} of them copied by reference", stats.referenceUnits) : "",
               (journaled - start) / 1e6, (nowNs() - journaled) / 1e6);
}

kj::Promise<void> Device::handOff(std::string target, wire::HandOffResult::Builder result) {
  if (role_ != Role::active || !active_) fail("device {} is not active", options_.deviceId);
  return active_->handOff(kj::mv(target), result).then([this](FinalCheckpoint final) {
    becomeStandby(kj::mv(final));
  });
}

void Device::becomeStandby(FinalCheckpoint final) {
  const std::uint64_t epoch = active_->epoch();
  retiring_ = active_->retire();
  active_.reset();
  role_ = Role::standby;
  metrics_->role(false, 0);
  replica_.recordFinal(final.sequence, epoch, final.deviceState, std::move(final.hashes));
  replica_.markLive(false);  // the VMM is paused at the final checkpoint, and quits
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

kj::Promise<void> Device::answerActivate() {
  static bool lost = false;
  const char* hook = std::getenv("VMSYNC_TEST_LOSE_ACTIVATE_ANSWER");
  if (lost || hook == nullptr || std::string(hook) != "1") return kj::READY_NOW;
  lost = true;
  spdlog::warn("{}: test hook: the answer to activate is lost (the connection drops; the VM runs)", options_.deviceId);
  background_.add(kj::evalLater([this] { link_.restart(); }));
  return kj::NEVER_DONE;
}

kj::Promise<void> Device::park(wire::HandOffResult::Builder result) {
  if (!active()) fail("device {} is not active", options_.deviceId);
  const std::uint64_t epoch = active_->epoch();
  return active_->handOff("the server (parking the VM)", result)
      .then([this, epoch](FinalCheckpoint final) {
        const std::uint64_t sequence = final.sequence;
        becomeStandby(kj::mv(final));
        auto release = link_.session().releaseLeaseRequest();
        release.setEpoch(epoch);
        return release.send().ignoreResult().then([this, sequence] {
          spdlog::info("{}: VM '{}' parked at checkpoint {}: any up-to-date device may resume it", options_.deviceId,
                       replica_.spec().vmId, sequence);
        });
      });
}

kj::Promise<void> Device::parkAndExit(wire::HandOffResult::Builder result) {
  return park(result).then([this] {
    // After the answer is on its way.
    background_.add(io_.provider->getTimer().afterDelay(300 * kj::MILLISECONDS).then([this] { exit_.fulfiller->fulfill(); }));
  });
}

void Device::activate(std::uint64_t epoch, wire::ActivateResult::Builder result) {
  if (role_ != Role::standby) fail("device {} is already active", options_.deviceId);
  retireVm();  // a VMM that handed off from here must be gone before another uses the image
  std::string state = replica_.deviceStateForResume();
  // Trackers first: Diff Prev copies the image as its reference, and that copy
  // must be the final checkpoint's image, taken before the guest runs again.
  auto active =
      std::make_unique<ActiveVm>(io_, options_, replica_, link_, epoch, replica_.takeVerifiedHashes(), *metrics_);
  active->resume({reinterpret_cast<const std::byte*>(state.data()), state.size()}, result);
  active_ = std::move(active);
  role_ = Role::active;
}

namespace {

/// Resolves at the next SIGTERM or SIGINT.
kj::Promise<void> nextStopSignal(kj::AsyncIoContext& io) {
  return io.unixEventPort.onSignal(SIGTERM).exclusiveJoin(io.unixEventPort.onSignal(SIGINT)).ignoreResult();
}

/// On a stop signal an active device parks its VM before it exits: the VM is
/// then resumable on any up-to-date device. Bounded, and a second signal ends
/// it at once. Returns the exit code.
int parkBeforeExit(kj::AsyncIoContext& io, Device& device, const std::string& id, const ServiceNotifier& systemd) {
  constexpr auto kParkTimeout = 60 * kj::SECONDS;
  systemd.stopping("parking the VM: a final checkpoint to the server");
  spdlog::info("{}: stopping: parking the VM first (a second signal stops at once)", id);
  capnp::MallocMessageBuilder timings;
  auto parked = device.park(timings.initRoot<wire::HandOffResult>())
                    .then([]() { return std::string(); },
                          [](kj::Exception&& e) { return describe(e); })
                    .exclusiveJoin(nextStopSignal(io).then([] { return std::string("a second signal came"); }))
                    .exclusiveJoin(io.provider->getTimer().afterDelay(kParkTimeout).then([] {
                      return std::string("no answer within 60 s");
                    }));
  const std::string why = parked.wait(io.waitScope);
  if (why.empty()) return 0;
  spdlog::error("{}: could not park the VM ({}); it stops here unparked: the server keeps the last checkpoint it "
                "stored, and what the guest did since is lost", id, why);
  return 1;
}

}  // namespace

int runDevice(const DeviceOptions& options, Role initialRole) {
  // Before QEMU or any thread starts: it takes systemd's variables out of the environment.
  const ServiceNotifier systemd;
  try {
    if (options.deviceId.empty()) fail("--device is required");
    if (options.stateDir.empty()) fail("--state is required");
    if (options.intervalSeconds <= 0) fail("--interval must be positive, not {}", options.intervalSeconds);
    setDeadLinkSeconds(options.deadLinkSeconds);
    kj::UnixEventPort::captureSignal(SIGTERM);
    kj::UnixEventPort::captureSignal(SIGINT);
    // The images, the serial console and the VMM's files are the guest's:
    // for this user alone, whoever else uses the device.
    ::umask(077);
    auto io = kj::setupAsyncIo();
    Device device(io, options);
    // Pinged whenever the loop runs, from here to the exit.
    auto watchdog = systemd.watchdog(io.provider->getTimer()).eagerlyEvaluate(nullptr);
    // A stop while it waits for the server (or catches up) is a stop, not a failure.
    bool stoppedEarly = false;
    device.start(initialRole)
        .exclusiveJoin(nextStopSignal(io).then([&stoppedEarly] { stoppedEarly = true; }))
        .wait(io.waitScope);
    if (stoppedEarly) {
      systemd.stopping("stopped before the device was up");
      spdlog::info("{}: stopped before the device was up", options.deviceId);
      return 0;
    }
    systemd.ready(device.active() ? "active: the VM runs on this device"
                                  : "standby: registered with the server, following the VM");
    bool signalled = true;
    nextStopSignal(io)
        .exclusiveJoin(device.exitRequested().then([&signalled] { signalled = false; }))
        .wait(io.waitScope);
    if (!signalled) {
      systemd.stopping("the VM is parked; exiting as the server asked");
      spdlog::info("{}: the VM is parked; exiting as the server asked", options.deviceId);
      return 0;
    }
    if (device.active()) return parkBeforeExit(io, device, options.deviceId, systemd);
    systemd.stopping("stopping");
    spdlog::info("{}: stopping", options.deviceId);
    return 0;
  } catch (const Error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const kj::Exception& e) {
    spdlog::error("{}", describe(e));
    return 1;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}

}  // namespace vmsync
