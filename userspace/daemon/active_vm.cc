#include "daemon/active_vm.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>

#include "base/durable_file.h"
#include "base/error.h"
#include "checkpoint/checkpoint_identity.h"
#include "checkpoint/device_state_codec.h"
#include "transport/rpc_util.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

kj::ArrayPtr<const kj::byte> asCapnp(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()};
}

const char* kindName(wire::CheckpointKind kind) {
  switch (kind) {
    case wire::CheckpointKind::FULL: return "full";
    case wire::CheckpointKind::FINAL: return "resumable point";
    default: return "incremental";
  }
}

}  // namespace

ActiveVm::ActiveVm(kj::AsyncIoContext& io, const DeviceOptions& options, Replica& replica, ServerLink& link,
                   std::uint64_t epoch, ImageHashes receiverHashes, DeviceMetrics& metrics)
    : io_(io), options_(options), metrics_(metrics), replica_(replica), link_(link), epoch_(epoch) {
  metrics_.role(true, epoch);
  const LocalSpec& spec = replica_.spec();
  // Diff Prev diffs against the receiver's copy: after a switch that is this
  // device's own image as it stands now (the final checkpoint); for a new VM,
  // zeros. The copy is taken here, before the guest runs again.
  const bool copyReference = spec.policy == wire::Policy::DIFF_PREV && replica_.applied() > 0;
  auto reference = [&](const ImageFile& image) {
    return copyReference ? image.copyBytes() : std::vector<std::byte>{};
  };
  ramTracker_ = std::make_unique<ImageTracker>(replica_.ram(), std::move(receiverHashes.ram), spec.policy,
                                               /*compress=*/true, reference(replica_.ram()));
  diskTracker_ = std::make_unique<ImageTracker>(replica_.disk(), std::move(receiverHashes.disk), spec.policy,
                                                /*compress=*/true, reference(replica_.disk()));
  if (options_.compression.automatic) compressionSelector_.emplace();
  chooseCompression();
  if (isOrigPolicy(spec.policy) && replica_.applied() > 0) {
    replica_.openBase();
    ramTracker_->setBase(*replica_.baseRam());
    diskTracker_->setBase(*replica_.baseDisk());
  }
}

ActiveVm::~ActiveVm() {
  // A push under way, or a hand-off waiting for it, must not reach this
  // object once it is gone (it did, when a fenced device became a standby
  // while the server's handOff call held the push: SIGSEGV in onPushFailed).
  canceler_.cancel("the VM is no longer active on this device");
  if (vm_) {
    spdlog::info("stopping the VM (it is not handed off; the server keeps the last checkpoint)");
    vm_->quit();
    vm_.reset();
  }
  blockSource_.reset();
  loop_.reset();
}

void ActiveVm::boot() {
  replica_.markLive(true);
  setUpDisk();
  vm_ = std::make_unique<QemuVm>(vmConfigFor(options_, replica_, loop_.get(), false));
  attachSources();
  vm_->cont();
  const LocalSpec& spec = replica_.spec();
  spdlog::info("{}: VM '{}' running under {} ({} MiB RAM, {} MiB disk), lease epoch {}", options_.deviceId,
               spec.vmId, spec.accel, spec.memoryBytes >> 20, spec.diskBytes >> 20, epoch_);
  startCheckpoints();
}

void ActiveVm::resume(std::span<const std::byte> state, wire::ActivateResult::Builder result) {
  const std::uint64_t t0 = nowNs();
  replica_.markLive(true);
  setUpDisk();
  vm_ = std::make_unique<QemuVm>(vmConfigFor(options_, replica_, loop_.get(), true));
  try {
    vm_->loadDeviceState(state);
  } catch (const Error&) {
    vm_->quit();
    vm_.reset();
    loop_.reset();
    replica_.markLive(false);  // the guest never ran: the image is still the final checkpoint's
    throw;
  }
  attachSources();
  const std::uint64_t t1 = nowNs();
  vm_->cont();
  const std::uint64_t t2 = nowNs();
  result.setDeviceStateLoadNs(t1 - t0);
  result.setResumeNs(t2 - t1);
  spdlog::info("{}: VM resumed from checkpoint {} (lease epoch {})", options_.deviceId, replica_.applied(), epoch_);
  startCheckpoints();
}

void ActiveVm::startCheckpoints() {
  lastRenewedNs_ = nowNs();
  lastResumableNs_ = nowNs();
  renewals_ = renewLoop().eagerlyEvaluate([](kj::Exception&& e) { spdlog::error("lease renewal: {}", describe(e)); });
  spdlog::info("{}: active (policy {}, page source {}, block source {}, checkpoint every {} s)", options_.deviceId,
               policyName(replica_.spec().policy), pageSource_->name(), blockSource_->name(),
               options_.intervalSeconds);
  stopping_ = false;
  if (options_.targetSwitchMs > 0) {
    // The device state of the last switch, if there was one; else what QEMU
    // saves for a small VM, with room to spare.
    std::error_code ec;
    const auto stateBytes = fs::file_size(replica_.path("device-state.bin"), ec);
    adaptive_.emplace(std::chrono::milliseconds(options_.targetSwitchMs), options_.intervalSeconds,
                      ec ? std::uint64_t{512 * 1024} : stateBytes);
    adaptive_->setGoal(parseIntervalGoal(options_.optimize), radioPowerModel(options_.radio));
    lastPushCpuSeconds_ = processCpuSeconds();
  }
  lastHarvestNs_ = 0;
  // The first checkpoint of a new VM is the full sync; after a switch the
  // first one is incremental on top of the final checkpoint.
  auto first = pushCheckpoint(replica_.applied() == 0 ? wire::CheckpointKind::FULL
                                                      : wire::CheckpointKind::INCREMENTAL);
  inFlight_ = canceler_.wrap(kj::mv(first)).fork();
  scheduleCheckpoint();
}

void ActiveVm::scheduleCheckpoint() {
  timer_ = checkpointLoop().eagerlyEvaluate(
      [](kj::Exception&& e) { spdlog::error("checkpoint loop: {}", describe(e)); });
}

kj::Promise<void> ActiveVm::checkpointLoop() {
  auto delay =
      static_cast<std::uint64_t>((adaptive_ ? adaptive_->intervalSeconds() : options_.intervalSeconds) * 1e9);
  return whenIdle()
      .then([this, delay] { return io_.provider->getTimer().afterDelay(delay * kj::NANOSECONDS); })
      .then([this]() -> kj::Promise<void> {
        if (stopping_) return kj::READY_NOW;
        const bool resumableDue = options_.resumableEverySeconds > 0 && replica_.applied() > 0 && !selfPaused_ &&
                                  nowNs() - lastResumableNs_ >= options_.resumableEverySeconds * 1e9;
        // The full sync again when the first one never reached the server.
        inFlight_ = canceler_
                        .wrap(resumableDue ? pushResumablePoint()
                                           : pushCheckpoint(replica_.applied() == 0
                                                                ? wire::CheckpointKind::FULL
                                                                : wire::CheckpointKind::INCREMENTAL))
                        .fork();
        return checkpointLoop();
      });
}

kj::Promise<void> ActiveVm::whenIdle() {
  KJ_IF_MAYBE(push, inFlight_) { return push->addBranch(); }
  return kj::READY_NOW;
}

void ActiveVm::describeCheckpoint(wire::Checkpoint::Builder checkpoint, wire::CheckpointKind kind,
                                  std::uint64_t sequence) const {
  checkpoint.setVmId(replica_.spec().vmId);
  checkpoint.setEpoch(epoch_);
  checkpoint.setSequence(sequence);
  checkpoint.setBaseSequence(replica_.applied());
  checkpoint.setKind(kind);
  checkpoint.setPolicy(replica_.spec().policy);
  checkpoint.setOrigin(options_.deviceId);
  checkpoint.setCreatedUnixNs(static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count()));
}

void ActiveVm::attachSpec(wire::Checkpoint::Builder checkpoint) const {
  const LocalSpec& local = replica_.spec();
  auto spec = checkpoint.initSpec();
  spec.setVmId(local.vmId);
  spec.setMemoryBytes(local.memoryBytes);
  spec.setDiskBytes(local.diskBytes);
  spec.setKernelCmdline(local.cmdline);
  spec.setAccel(local.accel);
  spec.setCpuModel(local.cpuModel);
  spec.setPolicy(local.policy);
  spec.setVcpus(local.vcpus);
  spec.setFreePageReporting(local.freePageReporting);
  std::string kernel = readWholeFile(replica_.path("vmlinuz"), 256u << 20);
  std::string initrd = readWholeFile(replica_.path("initrd.img"), 1024u << 20);
  spec.setKernel(kj::arrayPtr(reinterpret_cast<const kj::byte*>(kernel.data()), kernel.size()));
  spec.setInitrd(kj::arrayPtr(reinterpret_cast<const kj::byte*>(initrd.data()), initrd.size()));
}

kj::Promise<void> ActiveVm::pushCheckpoint(wire::CheckpointKind kind) {
  if (!link_.connected()) {
    spdlog::debug("{}: not connected; the changes wait for the next checkpoint", options_.deviceId);
    return kj::READY_NOW;
  }
  auto pending = std::make_shared<PendingPush>();
  const std::uint64_t t0 = nowNs();
  try {
    DirtyUnits pages = pageSource_->harvest();
    DirtyUnits blocks = blockSource_->harvest();
    if (pages.everything && !pages.rescanReason.empty())
      spdlog::info("{}: the {} source asks for a rescan: {}", options_.deviceId, pageSource_->name(),
                   pages.rescanReason);
    if (kind == wire::CheckpointKind::FULL) {
      // The whole image, not only what was written since the VMM started.
      pages = DirtyUnits{.everything = true};
      blocks = DirtyUnits{.everything = true};
    }
    chooseCompression();
    pending->memory = ramTracker_->collect(pages);
    pending->disk = diskTracker_->collect(blocks);
    noteEncoded(*pending);
  } catch (const Error& e) {
    spdlog::error("{}: harvest failed: {}", options_.deviceId, e.what());
    return kj::READY_NOW;
  }
  pending->sequence = replica_.applied() + 1;
  const double sinceLastHarvest = lastHarvestNs_ ? static_cast<double>(t0 - lastHarvestNs_) / 1e9 : 0.0;
  lastHarvestNs_ = t0;
  auto request = link_.session().pushRequest();
  auto checkpoint = request.initCheckpoint();
  describeCheckpoint(checkpoint, kind, pending->sequence);
  toWire(pending->memory, pending->disk, checkpoint);
  link_.holdWhileSending(pending);
  if (kind == wire::CheckpointKind::FULL) attachSpec(checkpoint);
  // Logged with the acknowledgement: what the server promised to keep.
  pending->identity = describeIdentity(checkpoint.asReader());
  const std::uint64_t harvestNs = nowNs() - t0;
  const std::uint64_t wireBytes = request.totalSize().wordCount * sizeof(capnp::word);
  auto progress =
      link_.watchTransfer(fmt::format("{}: checkpoint {}", options_.deviceId, pending->sequence), wireBytes);
  const std::uint64_t sendStart = pending->sentNs = nowNs();
  return request.send()
      .attach(kj::mv(progress))
      .then(
          [this, pending, kind, harvestNs, wireBytes, sendStart,
           sinceLastHarvest](capnp::Response<wire::DeviceSession::PushResults>) {
            onPushStored(*pending, kind, wireBytes, sinceLastHarvest, harvestNs, sendStart);
            link_.sent(pending);
          },
          [this, pending](kj::Exception&& e) { onPushFailed(pending, e); })
      .eagerlyEvaluate(nullptr);
}

void ActiveVm::onPushStored(const PendingPush& pending, wire::CheckpointKind kind, std::uint64_t wireBytes,
                            double sinceLastHarvest, std::uint64_t harvestNs, std::uint64_t sendStart) {
  const double sendSeconds = static_cast<double>(nowNs() - sendStart) / 1e9;
  leaseRenewed();  // the server stores pushes under the current lease only
  bytesPushed_ += wireBytes;
  // The daemon's CPU since the last push of any kind: harvest and encode,
  // and what else the process did meanwhile (a phone pays for all of it).
  const double cpuNow = processCpuSeconds();
  const double cpuSeconds = cpuNow - lastPushCpuSeconds_;
  lastPushCpuSeconds_ = cpuNow;
  if (compressionSelector_) compressionSelector_->onPush(wireBytes, sendSeconds);
  if (adaptive_ && kind == wire::CheckpointKind::INCREMENTAL) {
    if (adaptive_->onPush(wireBytes, sinceLastHarvest, harvestNs / 1e9, sendSeconds, cpuSeconds))
      logAdaptiveInterval(options_.deviceId, *adaptive_, options_.targetSwitchMs, bytesPushed_);
  }
  ramTracker_->acknowledge(pending.memory);
  diskTracker_->acknowledge(pending.disk);
  replica_.saveApplied(pending.sequence, epoch_);
  if (kind == wire::CheckpointKind::FULL && isOrigPolicy(replica_.spec().policy)) {
    // The full checkpoint is the base that Orig checkpoints are measured against.
    replica_.writeBase(pending.memory, pending.disk);
    ramTracker_->setBase(*replica_.baseRam());
    diskTracker_->setBase(*replica_.baseDisk());
  }
  // Pushed here, a checkpoint of kind FINAL is a resumable point (the VM went
  // on); a switch's or a park's final checkpoint goes through pushFinal().
  metrics_.pushed(kind == wire::CheckpointKind::FULL          ? "full"
                  : kind == wire::CheckpointKind::INCREMENTAL ? "incremental"
                                                              : "resumable",
                  wireBytes, sendSeconds, harvestNs / 1e9);
  metrics_.position(pending.sequence);
  const std::uint64_t bytes = pending.memory.encodedBytes + pending.disk.encodedBytes;
  const std::uint64_t references = pending.memory.references + pending.disk.references;
  spdlog::info(
      "{}: checkpoint {} ({}) stored: {} pages, {} blocks{}, {} bytes, harvest {:.1f} ms, "
      "{} bytes pushed and stored in {:.2f} s ({:.2f} Mbit/s), {}",
      options_.deviceId, pending.sequence, kindName(kind), pending.memory.units.size(), pending.disk.units.size(),
      references ? fmt::format(" ({} as references to units the receiver holds, {} bytes saved)", references,
                               pending.memory.referenceSavedBytes + pending.disk.referenceSavedBytes)
                 : std::string(),
      bytes, harvestNs / 1e6, wireBytes, sendSeconds, sendSeconds > 0 ? wireBytes * 8 / sendSeconds / 1e6 : 0.0,
      pending.identity);
}

void ActiveVm::onPushFailed(const std::shared_ptr<PendingPush>& pending, const kj::Exception& e) {
  // The server refuses pushes under an old lease epoch ("... was fenced ..."):
  // another device may run the VM now, so this one must not go on.
  const std::string why = describe(e);
  metrics_.pushFailed();
  if (why.find("was fenced") != std::string::npos) fence(why);
  // Nothing is lost: these units are shipped again with the next checkpoint.
  ramTracker_->retryLater(pending->memory);
  diskTracker_->retryLater(pending->disk);
  // A push made between registering again and settling an earlier
  // unconfirmed one reuses its sequence and is refused: the earlier
  // one is what the server may hold, so it is the one to settle.
  if (!link_.unconfirmed() || link_.unconfirmed()->sequence != pending->sequence) link_.markUnconfirmed(pending);
  spdlog::warn("{}: checkpoint {} not stored ({}; sent {:.2f} s before); its changes go into the next one",
               options_.deviceId, pending->sequence, describe(e),
               pending->sentNs ? static_cast<double>(nowNs() - pending->sentNs) / 1e9 : 0.0);
}

PendingPush ActiveVm::harvestEverything(bool encodeNow) {
  // The final checkpoint must be exact whatever the sources: reset them, then
  // (the VM is paused) compare every unit and say if a source missed one. A
  // page source that sees every write, the VMM's own too (kmod), is trusted
  // with RAM instead, unless --final-full-compare.
  DirtyUnits reportedPages = pageSource_->harvest();
  DirtyUnits reportedBlocks = blockSource_->harvest();
  PendingPush pending;
  const DirtyUnits everything{.everything = true};
  const bool fullRam = options_.finalFullCompare || reportedPages.everything || !pageSource_->reportsEveryWrite();
  const DirtyUnits& ram = fullRam ? everything : reportedPages;
  pending.memory = encodeNow ? ramTracker_->collect(ram) : ramTracker_->copyChanged(ram);
  pending.disk = encodeNow ? diskTracker_->collect(everything) : diskTracker_->copyChanged(everything);
  pending.ramFullCompare = fullRam;
  if (fullRam)
    pending.ramMissed = warnIfMissed(pageSource_->name(), reportedPages, pending.memory);
  else
    spdlog::info("{}: the final harvest took the {} source's list: {} changed units", options_.deviceId,
                 pageSource_->name(), pending.memory.units.size());
  warnIfMissed(blockSource_->name(), reportedBlocks, pending.disk);
  if (const std::string counters = pageSource_->counters(); !counters.empty())
    spdlog::info("{}: {}: {}", options_.deviceId, pageSource_->name(), counters);
  pending.sequence = replica_.applied() + 1;
  return pending;
}

void ActiveVm::runOn() {
  pausedForHandOff_ = false;
  if (fenced_) return;  // another device may run the VM
  if (selfPaused_) return;  // resumed once the lease is confirmed
  vm_->cont();
  stopping_ = false;
  scheduleCheckpoint();
}

kj::Promise<FinalCheckpoint> ActiveVm::handOff(std::string target, wire::HandOffResult::Builder result) {
  if (!vm_) fail("device {} has no running VM", options_.deviceId);
  if (fenced_) fail("device {} was fenced: its VM stays paused and it ships nothing", options_.deviceId);
  auto session = link_.session();  // before anything stops
  stopping_ = true;
  timer_ = nullptr;
  const std::uint64_t requested = nowNs();
  return canceler_.wrap(whenIdle().then([this, target, result, requested, session]() mutable {
    spdlog::info("{}: handing off to {} (waited {:.1f} ms for the checkpoint under way)", options_.deviceId, target,
                 (nowNs() - requested) / 1e6);
    auto pending = std::make_shared<PendingPush>();
    auto final = std::make_shared<FinalCheckpoint>();
    pauseForFinal(*pending, *final, result);
    return pushFinal(kj::mv(session), pending, final, result);
  }));
}

void ActiveVm::pauseForFinal(PendingPush& pending, FinalCheckpoint& final, wire::HandOffResult::Builder result) {
  const std::uint64_t t0 = nowNs();
  pausedForHandOff_ = true;
  vm_->stop();
  const std::uint64_t t1 = nowNs();
  pending = harvestEverything();
  const std::uint64_t t2 = nowNs();
  try {
    final.deviceState = vm_->saveDeviceState();
  } catch (const Error&) {
    ramTracker_->retryLater(pending.memory);
    diskTracker_->retryLater(pending.disk);
    runOn();
    throw;
  }
  const std::uint64_t t3 = nowNs();
  // The digest of the image the receiver will hold: every unit as shipped.
  final.hashes = ImageHashes{ramTracker_->hashesAfter(pending.memory), diskTracker_->hashesAfter(pending.disk)};
  final.digest = imageDigest(final.hashes.ram, final.hashes.disk);
  final.sequence = pending.sequence;
  result.setFinalSequence(pending.sequence);
  result.setPageSource(pageSource_->name());
  result.setFinalRamFullCompare(pending.ramFullCompare);
  result.setFinalRamUnits(pending.memory.units.size());
  result.setFinalRamMissed(pending.ramMissed);
  result.setPauseNs(t1 - t0);
  result.setFinalHarvestNs(t2 - t1);
  result.setDeviceStateSaveNs(t3 - t2);
}

kj::Promise<FinalCheckpoint> ActiveVm::pushFinal(wire::DeviceSession::Client session,
                                                 std::shared_ptr<PendingPush> pending,
                                                 std::shared_ptr<FinalCheckpoint> final,
                                                 wire::HandOffResult::Builder result) {
  auto request = session.pushRequest();
  auto checkpoint = request.initCheckpoint();
  describeCheckpoint(checkpoint, wire::CheckpointKind::FINAL, pending->sequence);
  toWire(pending->memory, pending->disk, checkpoint);
  link_.holdWhileSending(pending);
  const std::uint64_t stateWireBytes = setDeviceState(checkpoint, final->deviceState);
  result.setDeviceStateBytes(final->deviceState.size());
  result.setDeviceStateWireBytes(stateWireBytes);
  result.setFinalBytes(pending->memory.encodedBytes + pending->disk.encodedBytes + stateWireBytes);
  checkpoint.setImageDigest(asCapnp(final->digest));
  pending->identity = describeIdentity(checkpoint.asReader());
  const std::uint64_t wireBytes = request.totalSize().wordCount * sizeof(capnp::word);
  auto progress =
      link_.watchTransfer(fmt::format("{}: final checkpoint {}", options_.deviceId, pending->sequence), wireBytes);
  const std::uint64_t start = pending->sentNs = nowNs();
  return request.send()
      .attach(kj::mv(progress))
      .then(
          [this, result, pending, final, start, wireBytes](capnp::Response<wire::DeviceSession::PushResults>) mutable {
            link_.sent(pending);
            result.setPushNs(nowNs() - start);
            metrics_.pushed("final", wireBytes, (nowNs() - start) / 1e9, result.getFinalHarvestNs() / 1e9);
            metrics_.position(final->sequence);
            spdlog::info("{}: final checkpoint {} stored (image digest {}), {}", options_.deviceId,
                         final->sequence, toHex(final->digest), pending->identity);
            return kj::mv(*final);
          },
          [this, pending](kj::Exception&& e) -> FinalCheckpoint {
            // The server did not confirm the final checkpoint: keep running here.
            // Should it have stored it after all, the reconnection finds out.
            ramTracker_->retryLater(pending->memory);
            diskTracker_->retryLater(pending->disk);
            link_.markUnconfirmed(pending);
            runOn();
            rpcFail(fmt::format("{} could not store its final checkpoint ({}); the VM goes on running there",
                                options_.deviceId, describe(e)));
          });
}

RetiredVmm ActiveVm::retire() {
  stopping_ = true;
  timer_ = nullptr;
  renewals_ = nullptr;
  pageSource_.reset();
  return RetiredVmm{std::move(vm_), std::move(blockSource_), std::move(loop_)};
}

void ActiveVm::chooseCompression() {
  const PayloadCompression choice =
      compressionSelector_ ? compressionSelector_->choice() : options_.compression.fixed;
  if (compressionChosen_ && choice == ramTracker_->compression()) return;
  compressionChosen_ = true;
  if (compressionSelector_)
    spdlog::info("{}: compression {} (auto): {}", options_.deviceId, choice.name(), compressionSelector_->explain());
  else
    spdlog::info("{}: compression {} (--compression)", options_.deviceId, choice.name());
  ramTracker_->setCompression(choice);
  diskTracker_->setCompression(choice);
}

void ActiveVm::noteEncoded(const PendingPush& pending) {
  if (!compressionSelector_) return;
  compressionSelector_->onEncoded(pending.memory.compression, pending.memory.rawBytes + pending.disk.rawBytes,
                                  pending.memory.encodedBytes + pending.disk.encodedBytes,
                                  pending.memory.encodeCpuSeconds + pending.disk.encodeCpuSeconds);
}

}  // namespace vmsync
