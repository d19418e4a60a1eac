#include "daemon/device.h"

#include <capnp/serialize.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <kj/async-unix.h>
#include <kj/timer.h>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "checkpoint/adaptive_interval.h"
#include "harvest/bpf_block_source.h"
#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/checkpoint_record.h"
#include "base/crash_point.h"
#include "base/durable_file.h"
#include "base/error.h"
#include "vmm/image_file.h"
#include "harvest/kmod_page_source.h"
#include "vmm/loop_device.h"
#include "vmm/qemu_vm.h"
#include "transport/rpc_util.h"
#include "transport/secure_channel.h"
#include "transport/transfer_progress.h"
#include "harvest/unit_hashes.h"
#include "vmsync.capnp.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

kj::ArrayPtr<const kj::byte> asCapnp(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()};
}

std::span<const std::byte> asSpan(capnp::Data::Reader data) {
  return {reinterpret_cast<const std::byte*>(data.begin()), data.size()};
}

/// What a device keeps about its VM besides the images (vm.json).
struct LocalSpec {
  std::string vmId;
  std::uint64_t memoryBytes = 0;
  std::uint64_t diskBytes = 0;
  std::string cmdline;
  std::string accel;
  std::string cpuModel = "qemu64";
  std::uint32_t vcpus = 1;
  wire::Policy policy = wire::Policy::DIRTY_PREV;
};

LocalSpec specFromWire(wire::VmSpec::Reader spec) {
  return LocalSpec{spec.getVmId(), spec.getMemoryBytes(), spec.getDiskBytes(), spec.getKernelCmdline(),
                   spec.getAccel(),  spec.getCpuModel(),    spec.getVcpus(),       spec.getPolicy()};
}

}  // namespace

/// One device: its images, its VMM when active, its connection to the server.
class Device {
 public:
  Device(kj::AsyncIoContext& io, DeviceOptions options)
      : io_(io), options_(std::move(options)), transport_(clientTransport(options_.credential, options_.insecure)) {
    if (!options_.credential.empty()) {
      DeviceCredential credential = loadCredential(options_.credential);
      if (credential.device != options_.deviceId)
        fail("credential {} is for device {} (of user {}), not for device {}", options_.credential,
             credential.device, credential.user, options_.deviceId);
    }
    fs::create_directories(options_.stateDir);
    dir_ = fs::absolute(options_.stateDir).string();
    loadLocalState();
    redoJournal();
  }

  ~Device() {
    retireVm();
    if (vm_) {
      spdlog::info("stopping the VM (it is not handed off; the server keeps the last checkpoint)");
      vm_->quit();
      vm_.reset();
    }
    blockSource_.reset();
    loop_.reset();
  }

  /// Connects, registers and, for the active role, creates and starts the VM.
  kj::Promise<void> start(Role role);

  // DevicePeer calls from the server.
  void apply(wire::Checkpoint::Reader checkpoint, wire::DevicePeer::ApplyResults::Builder results);
  kj::Promise<void> handOff(std::string target, wire::HandOffResult::Builder result);
  void activate(std::uint64_t epoch, wire::ActivateResult::Builder result);

 private:
  std::string path(const char* name) const { return dir_ + "/" + name; }
  void loadLocalState();
  /// Finishes an apply a crash interrupted, from the journal, so the image is
  /// at a whole checkpoint before this device offers it to anyone.
  void redoJournal();
  /// Writes the image changes of `checkpoint` (already checked to follow this
  /// image) and records the sequence reached.
  ApplyStats applyToImage(wire::Checkpoint::Reader checkpoint);
  void saveApplied(std::uint64_t sequence);
  void saveLocalSpec();
  void openImages(bool create);
  /// Has the page cache hold the images in 4 KiB folios (ImageFile::recache).
  void recacheImages();
  /// Orig policies: opens the base image files.
  void openBase();
  /// Orig policies: writes the base image from the full checkpoint's units.
  void writeBase(const ImageDelta& memory, const ImageDelta& disk);
  VmConfig vmConfig(bool incoming) const;
  void createFromImage();
  /// Creates the VM from --image, boots it and starts shipping checkpoints.
  void createAndRun(std::uint64_t epoch);
  /// Throws Error when --image lacks a file the VM needs.
  void checkImage() const;
  /// Takes the active role: sources and trackers over the image as the receivers hold it.
  void prepareActive(std::uint64_t epoch, std::vector<std::uint64_t> ramHashes, std::vector<std::uint64_t> diskHashes);
  /// Ships the first checkpoint and starts the incremental loop.
  void startCheckpoints();
  /// Quits a VMM that handed off, if it has not quit yet.
  void retireVm();
  /// Logs units the final scan found that `source` had not reported.
  void warnIfMissed(const std::string& source, const DirtyUnits& reported, const ImageDelta& delta);
  /// --disk loop: attaches the disk image to a loop device for the VMM.
  void setUpDisk();
  /// Starts the page and block sources for the VMM just started (still paused).
  void attachSources();
  /// Starts the incremental checkpoint loop (replacing any previous one).
  void scheduleCheckpoint();
  kj::Promise<void> checkpointLoop();
  kj::Promise<void> pushCheckpoint(wire::CheckpointKind kind);
  kj::Promise<void> whenIdle();
  /// Logs the progress of a push of `bytes` on the current connection while the promise lives.
  kj::Promise<void> watchTransfer(std::string what, std::uint64_t bytes);

  /// A checkpoint on its way to the server.
  struct PendingPush {
    ImageDelta memory;
    ImageDelta disk;
    std::uint64_t sequence = 0;
  };

  /// `push`'s message is on its way on the current connection.
  void holdWhileSending(const std::shared_ptr<const PendingPush>& push) {
    sending_.push_back(push);
  }
  /// The server answered `push`: it has read all of its message.
  void sent(const std::shared_ptr<const PendingPush>& push) { std::erase(sending_, push); }

  kj::Promise<capnp::Response<wire::SyncServer::RegisterResults>> connectAndRegister(std::uint64_t applied);
  void onDisconnected();
  kj::Promise<void> reconnectLoop(std::chrono::milliseconds delay);

  kj::AsyncIoContext& io_;
  DeviceOptions options_;
  std::string dir_;
  Role role_ = Role::standby;

  /// Checkpoints whose message on `connection_` references their payloads
  /// (toWire() does not copy them): kept until the server answers, or the
  /// connection is gone. Declared before it, so it outlives it.
  std::vector<std::shared_ptr<const PendingPush>> sending_;
  kj::Own<RpcConnection> connection_;
  std::optional<wire::SyncServer::Client> server_;
  std::optional<wire::DeviceSession::Client> session_;

  LocalSpec spec_;
  bool haveSpec_ = false;
  ClientTransport transport_;
  std::uint64_t applied_ = 0;
  std::uint64_t epoch_ = 0;
  std::uint64_t deviceStateSequence_ = 0;  // final checkpoint whose device state we hold
  std::string damaged_;                    // set when the local image failed verification

  std::unique_ptr<ImageFile> ram_;
  std::unique_ptr<ImageFile> disk_;
  std::unique_ptr<ImageFile> baseRam_;   // Orig policies: the base image
  std::unique_ptr<ImageFile> baseDisk_;
  std::unique_ptr<QemuVm> vm_;
  std::unique_ptr<QemuVm> retiringVm_;   // paused after a handoff, quitting in the background
  std::unique_ptr<BlockSource> retiringBlockSource_;
  std::unique_ptr<LoopDevice> loop_;           // --disk loop: the block device the VMM writes
  std::unique_ptr<LoopDevice> retiringLoop_;
  std::unique_ptr<PageSource> pageSource_;
  std::unique_ptr<BlockSource> blockSource_;
  std::unique_ptr<ImageTracker> ramTracker_;
  std::unique_ptr<ImageTracker> diskTracker_;
  std::vector<std::uint64_t> verifiedRamHashes_;
  std::vector<std::uint64_t> verifiedDiskHashes_;

  bool stopping_ = false;                       // no new incremental checkpoints
  kj::Maybe<kj::Promise<void>> timer_;          // next incremental checkpoint
  kj::Maybe<kj::ForkedPromise<void>> inFlight_; // push under way
  std::shared_ptr<PendingPush> unconfirmed_;    // last push whose answer never came
  kj::Maybe<kj::Promise<void>> watch_;          // notices a lost connection
  kj::Maybe<kj::Promise<void>> reconnect_;      // reconnection attempts
  std::optional<AdaptiveInterval> adaptive_;    // --target-switch-ms
  std::uint64_t lastHarvestNs_ = 0;             // of the previous checkpoint, for the guest's dirty rate
  std::uint64_t bytesPushed_ = 0;               // since this device became active: the link's share of the cost

  class LogTaskErrors final : public kj::TaskSet::ErrorHandler {
   public:
    void taskFailed(kj::Exception&& e) override { spdlog::warn("background task: {}", describe(e)); }
  };
  LogTaskErrors taskErrors_;
  kj::TaskSet background_{taskErrors_};         // work left for after an answer
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

void Device::loadLocalState() {
  if (fs::exists(path("applied"))) {
    std::string text = readWholeFile(path("applied"), 64);
    try {
      applied_ = std::stoull(text);
    } catch (const std::exception&) {
      fail("{} is damaged: '{}' is not a sequence number", path("applied"), text);
    }
  }
  if (fs::exists(path("vm.json"))) {
    try {
      auto j = nlohmann::json::parse(readWholeFile(path("vm.json"), 1 << 20));
      spec_ = LocalSpec{j.at("vm_id"), j.at("memory_bytes"), j.at("disk_bytes"), j.at("cmdline"),
                        j.at("accel"), j.at("cpu_model"),    j.at("vcpus"),     parsePolicy(j.at("policy").get<std::string>())};
      haveSpec_ = true;
    } catch (const nlohmann::json::exception& e) {
      fail("{} is damaged: {}", path("vm.json"), e.what());
    }
  }
  if (fs::exists(path("device-state.seq")))
    deviceStateSequence_ = std::stoull(readWholeFile(path("device-state.seq"), 64));
  if (applied_ > 0 && !haveSpec_) fail("{} says checkpoint {} was applied but vm.json is missing", dir_, applied_);
  if (haveSpec_) openImages(false);
  if (haveSpec_ && applied_ > 0 && isOrigPolicy(spec_.policy) && fs::exists(path("base-ram.img"))) openBase();
}

void Device::redoJournal() {
  const std::string journal = path("apply.journal");
  if (!fs::exists(journal)) return;
  std::string why;
  KJ_IF_MAYBE(words, readRecordFile(journal, why)) {
    capnp::FlatArrayMessageReader message(*words, rpcReaderOptions());
    auto checkpoint = message.getRoot<wire::Checkpoint>();
    if (checkpoint.getSequence() > applied_) {
      spdlog::warn("{}: applying checkpoint {} was interrupted (the image is between {} and it); finishing it from "
                   "the journal", options_.deviceId, checkpoint.getSequence(), applied_);
      try {
        applyToImage(checkpoint);
      } catch (const Error& e) {
        // The image is neither the old checkpoint nor the new one: start over
        // from the server's base, which replaces all of it.
        spdlog::error("{}: cannot finish checkpoint {} ({}); the image is discarded and will be synced again from "
                      "the server's base", options_.deviceId, checkpoint.getSequence(), e.what());
        saveApplied(0);
      }
    }
  } else {
    // Torn: the crash came while the journal was written, before the image.
    spdlog::info("{}: discarding a torn apply journal ({}); the image was not touched", options_.deviceId, why);
  }
  fs::remove(journal);
}

void Device::saveApplied(std::uint64_t sequence) {
  std::string text = std::to_string(sequence);
  writeFileDurably(path("applied"), text.data(), text.size());
  applied_ = sequence;
}

void Device::saveLocalSpec() {
  nlohmann::json j{{"vm_id", spec_.vmId},   {"memory_bytes", spec_.memoryBytes}, {"disk_bytes", spec_.diskBytes},
                   {"cmdline", spec_.cmdline}, {"accel", spec_.accel},           {"cpu_model", spec_.cpuModel},
                   {"vcpus", spec_.vcpus},     {"policy", policyName(spec_.policy)}};
  std::string text = j.dump(2);
  writeFileDurably(path("vm.json"), text.data(), text.size());
  haveSpec_ = true;
}

void Device::openImages(bool create) {
  ram_.reset();
  disk_.reset();
  if (create) {
    // A full checkpoint describes the whole image on top of zeros.
    fs::remove(path("ram.img"));
    fs::remove(path("disk.img"));
  }
  ram_ = std::make_unique<ImageFile>(path("ram.img"), true, create ? spec_.memoryBytes : 0);
  disk_ = std::make_unique<ImageFile>(path("disk.img"), true, create ? spec_.diskBytes : 0);
  if (ram_->sizeBytes() != spec_.memoryBytes || disk_->sizeBytes() != spec_.diskBytes)
    fail("local image in {} does not match the VM: RAM {} / {} bytes, disk {} / {} bytes", dir_, ram_->sizeBytes(),
         spec_.memoryBytes, disk_->sizeBytes(), spec_.diskBytes);
  // An image from before may be cached in large folios (a VMM ran on it, or
  // it was copied), which makes every checkpoint's unit writes slower.
  if (!create) recacheImages();
}

void Device::recacheImages() {
  const std::uint64_t start = nowNs();
  ram_->recache();
  disk_->recache();
  spdlog::info("{}: images recached in 4 KiB pages in {:.0f} ms", options_.deviceId,
               (nowNs() - start) / 1e6);
}

void Device::openBase() {
  baseRam_ = std::make_unique<ImageFile>(path("base-ram.img"), false);
  baseDisk_ = std::make_unique<ImageFile>(path("base-disk.img"), false);
  if (baseRam_->sizeBytes() != spec_.memoryBytes || baseDisk_->sizeBytes() != spec_.diskBytes)
    fail("base image in {} does not match the VM's sizes", dir_);
}

void Device::writeBase(const ImageDelta& memory, const ImageDelta& disk) {
  auto write = [&](const char* name, std::uint64_t bytes, const ImageDelta& delta) {
    fs::remove(path(name));
    ImageFile base(path(name), true, bytes);
    for (std::size_t i = 0; i < delta.hashes.size(); ++i)
      base.writeUnit(delta.hashes[i].first, {delta.raw.data() + i * kUnitSize, kUnitSize});
    base.sync();
  };
  write("base-ram.img", spec_.memoryBytes, memory);
  write("base-disk.img", spec_.diskBytes, disk);
  syncDirectory(dir_);  // the two new names
  openBase();
}

VmConfig Device::vmConfig(bool incoming) const {
  VmConfig config;
  config.qemuBinary = options_.qemuBinary;
  config.accel = spec_.accel;
  config.cpuModel = spec_.cpuModel;
  config.memoryBytes = spec_.memoryBytes;
  config.vcpus = spec_.vcpus;
  config.kernelPath = path("vmlinuz");
  config.initrdPath = path("initrd.img");
  config.kernelCmdline = spec_.cmdline;
  config.ramPath = path("ram.img");
  config.diskPath = path("disk.img");
  if (loop_) {
    // The VMM writes the loop device; its requests are what the bpf source sees.
    config.diskPath = loop_->path();
    config.diskCache = "none";
  }
  config.serialLogPath = path("serial.log");
  config.runDir = path("run");
  config.incoming = incoming;
  return config;
}

void Device::checkImage() const {
  if (options_.imageDir.empty()) fail("`vmsync active` needs --image DIR (built by vm-images/build.sh)");
  const fs::path image(options_.imageDir);
  for (const char* name : {"vmlinuz", "initrd.img", "disk.img", "cmdline"})
    if (!fs::exists(image / name)) fail("guest image {} has no {}; build it with vm-images/build.sh", image.string(), name);
}

void Device::createFromImage() {
  checkImage();
  const fs::path image(options_.imageDir);
  std::uint32_t memoryMb = options_.memoryMb;
  if (memoryMb == 0 && fs::exists(image / "spec.json")) {
    auto j = nlohmann::json::parse(readWholeFile((image / "spec.json").string(), 1 << 20));
    memoryMb = j.value("memory_mb", 0u);
  }
  if (memoryMb == 0) memoryMb = 128;
  fs::copy_file(image / "vmlinuz", path("vmlinuz"), fs::copy_options::overwrite_existing);
  fs::copy_file(image / "initrd.img", path("initrd.img"), fs::copy_options::overwrite_existing);
  copySparse((image / "disk.img").string(), path("disk.img"));
  fs::remove(path("ram.img"));
  fs::remove(path("device-state.bin"));
  fs::remove(path("device-state.seq"));
  deviceStateSequence_ = 0;
  const std::string cmdline = readImageCmdline(image.string());
  spec_ = LocalSpec{options_.vmId, std::uint64_t{memoryMb} << 20, fs::file_size(path("disk.img")), cmdline, "",
                    "qemu64",       1,                             parsePolicy(options_.policy)};
  fs::remove(path("base-ram.img"));
  fs::remove(path("base-disk.img"));
  if (spec_.diskBytes % kUnitSize != 0) fail("guest disk {} is not a multiple of 4096 bytes", (image / "disk.img").string());
  ram_ = std::make_unique<ImageFile>(path("ram.img"), true, spec_.memoryBytes);
  disk_ = std::make_unique<ImageFile>(path("disk.img"), true);
  spec_.accel = resolveAccel(options_.accel, vmConfig(false));
  saveLocalSpec();
  saveApplied(0);
}

kj::Promise<capnp::Response<wire::SyncServer::RegisterResults>> Device::connectAndRegister(std::uint64_t applied) {
  return transport_.connect(io_, options_.server)
      .catch_([this](kj::Exception&& e) -> kj::Own<RpcConnection> {
        rpcFail(fmt::format("cannot reach the sync server at {}: {}", options_.server, describe(e)));
      })
      .then([this, applied](kj::Own<RpcConnection> connection) {
        connection_ = kj::mv(connection);
        // The old connection is gone, and with it every message it was sending.
        sending_.clear();
        server_ = connection_->bootstrap().castAs<wire::SyncServer>();
        auto request = server_->registerRequest();
        request.setDeviceId(options_.deviceId);
        request.setPeer(kj::heap<DevicePeerImpl>(*this));
        request.setAppliedSequence(applied);
        return request.send();
      })
      .then([this](capnp::Response<wire::SyncServer::RegisterResults> registered) {
        session_ = registered.getSession();
        spdlog::info("{}: registered with {} (VM '{}', head {})", options_.deviceId, options_.server,
                     std::string(registered.getVmId()), registered.getHeadSequence());
        watch_ = connection_->onDisconnect()
                     .then([this] { onDisconnected(); })
                     .eagerlyEvaluate([](kj::Exception&& e) { spdlog::debug("connection watch: {}", describe(e)); });
        return kj::mv(registered);
      });
}

void Device::onDisconnected() {
  spdlog::warn("{}: lost the connection to the server {}; reconnecting", options_.deviceId, options_.server);
  session_.reset();
  server_.reset();
  reconnect_ = reconnectLoop(std::chrono::milliseconds(200))
                   .eagerlyEvaluate([](kj::Exception&& e) { spdlog::error("reconnect: {}", describe(e)); });
}

kj::Promise<void> Device::reconnectLoop(std::chrono::milliseconds delay) {
  return io_.provider->getTimer()
      .afterDelay(delay.count() * kj::MILLISECONDS)
      .then([this] { return connectAndRegister(applied_); })
      .then([this](capnp::Response<wire::SyncServer::RegisterResults> registered) -> kj::Promise<void> {
        if (role_ != Role::active) return kj::READY_NOW;
        // A push whose answer was lost may have been stored: only this device
        // pushes under its lease, so a head one past ours is that push.
        const std::uint64_t head = registered.getHeadSequence();
        if (unconfirmed_ && head == unconfirmed_->sequence) {
          ramTracker_->acknowledge(unconfirmed_->memory);
          diskTracker_->acknowledge(unconfirmed_->disk);
          saveApplied(head);
          spdlog::info("{}: checkpoint {} had reached the server before the connection broke", options_.deviceId,
                       head);
        }
        unconfirmed_.reset();
        if (head != applied_)
          fail("the server's chain ends at {} but this active device is at {}; not pushing", head, applied_);
        return session_->acquireLeaseRequest().send().then(
            [this](capnp::Response<wire::DeviceSession::AcquireLeaseResults> lease) {
              if (lease.getEpoch() != epoch_) {
                stopping_ = true;
                fail("the lease moved on (epoch {} -> {}) while this device was cut off; it stops pushing",
                     epoch_, lease.getEpoch());
              }
            });
      })
      .catch_([this, delay](kj::Exception&& e) -> kj::Promise<void> {
        if (session_) {
          spdlog::error("{}: {}", options_.deviceId, describe(e));
          return kj::READY_NOW;
        }
        spdlog::debug("{}: reconnect failed: {}", options_.deviceId, describe(e));
        return reconnectLoop(std::min(delay * 2, std::chrono::milliseconds(5000)));
      });
}

kj::Promise<void> Device::start(Role role) {
  if (role == Role::active) checkImage();  // before taking the lease
  return connectAndRegister(role == Role::active ? 0 : applied_)
      .then([this, role](capnp::Response<wire::SyncServer::RegisterResults> registered) -> kj::Promise<void> {
        if (role == Role::standby) return kj::READY_NOW;
        if (registered.getHeadSequence() != 0)
          fail("the server already holds VM '{}' at checkpoint {}; start this device with `vmsync standby` and "
               "switch to it", std::string(registered.getVmId()), registered.getHeadSequence());
        return session_->acquireLeaseRequest().send().then(
            [this](capnp::Response<wire::DeviceSession::AcquireLeaseResults> lease) -> kj::Promise<void> {
              try {
                createAndRun(lease.getEpoch());
                return kj::READY_NOW;
              } catch (const Error& e) {
                // Nothing runs here: give the lease back before saying why.
                std::string why = e.what();
                vm_.reset();
                auto release = session_->releaseLeaseRequest();
                release.setEpoch(lease.getEpoch());
                return release.send().then([why](auto&&) -> void { rpcFail(why); },
                                           [why](kj::Exception&&) -> void { rpcFail(why); });
              }
            });
      });
}

void Device::createAndRun(std::uint64_t epoch) {
  createFromImage();
  auto zeroRam = std::vector<std::uint64_t>(ram_->units(), zeroUnitHash());
  auto zeroDisk = std::vector<std::uint64_t>(disk_->units(), zeroUnitHash());
  prepareActive(epoch, std::move(zeroRam), std::move(zeroDisk));
  setUpDisk();
  vm_ = std::make_unique<QemuVm>(vmConfig(false));
  attachSources();
  vm_->cont();
  spdlog::info("{}: VM '{}' running under {} ({} MiB RAM, {} MiB disk), lease epoch {}",
               options_.deviceId, spec_.vmId, spec_.accel, spec_.memoryBytes >> 20,
               spec_.diskBytes >> 20, epoch);
  startCheckpoints();
}

void Device::prepareActive(std::uint64_t epoch, std::vector<std::uint64_t> ramHashes,
                           std::vector<std::uint64_t> diskHashes) {
  role_ = Role::active;
  epoch_ = epoch;
  // Diff Prev diffs against the receiver's copy: after a switch that is this
  // device's own image as it stands now (the final checkpoint); for a new VM, zeros.
  const bool copyReference = spec_.policy == wire::Policy::DIFF_PREV && applied_ > 0;
  auto reference = [&](const ImageFile& image) {
    return copyReference ? image.copyBytes() : std::vector<std::byte>{};
  };
  ramTracker_ = std::make_unique<ImageTracker>(*ram_, std::move(ramHashes), spec_.policy, options_.compress,
                                               reference(*ram_));
  diskTracker_ = std::make_unique<ImageTracker>(*disk_, std::move(diskHashes), spec_.policy, options_.compress,
                                                reference(*disk_));
  if (isOrigPolicy(spec_.policy) && applied_ > 0) {
    openBase();
    ramTracker_->setBase(*baseRam_);
    diskTracker_->setBase(*baseDisk_);
  }
}

void Device::setUpDisk() {
  if (options_.disk == "file") return;
  if (options_.disk != "loop") fail("--disk must be file or loop, not '{}'", options_.disk);
  loop_ = std::make_unique<LoopDevice>(path("disk.img"));
  spdlog::info("{}: guest disk on {} over {}", options_.deviceId, loop_->path(), path("disk.img"));
}

void Device::attachSources() {
  // Called with the VMM started but paused: nothing the guest writes can
  // happen before the sources watch.
  // kmod reads KVM's dirty log through vmsync.ko; auto takes it when both are there.
  const std::string kmodMissing = spec_.accel != "kvm" ? fmt::format("the VM runs under {}, not kvm", spec_.accel)
                                                       : KmodPageSource::unavailableReason();
  if (options_.pageSource == "kmod" && !kmodMissing.empty())
    fail("--page-source kmod is not available: {}", kmodMissing);
  if (options_.pageSource == "kmod" || (options_.pageSource == "auto" && kmodMissing.empty()))
    pageSource_ = std::make_unique<KmodPageSource>(vm_->pid(), qemuQ35GfnRanges(spec_.memoryBytes));
  else if (options_.pageSource == "scan" || options_.pageSource == "auto")
    pageSource_ = std::make_unique<ScanPageSource>();
  else
    fail("--page-source must be scan, kmod or auto, not '{}'", options_.pageSource);
  if (options_.blockSource == "scan") {
    blockSource_ = std::make_unique<ScanBlockSource>();
    return;
  }
  BpfBlockSourceOptions bpf;
  if (loop_) {
    bpf.mode = BpfBlockSourceOptions::Mode::BlockDevice;
    bpf.blockDevicePath = loop_->path();
  } else {
    bpf.mode = BpfBlockSourceOptions::Mode::File;
    bpf.vmmPid = vm_->pid();
    bpf.imageFd = findFileDescriptor(vm_->pid(), path("disk.img"));
  }
  bpf.maxImageBytes = spec_.diskBytes;
  if (options_.blockSource == "bpf") {
    auto source = std::make_unique<BpfBlockSource>(bpf);
    spdlog::info("{}: block source bpf: {}", options_.deviceId, source->description());
    blockSource_ = std::move(source);
    return;
  }
  auto probe = tryCreateBpfBlockSource(bpf);
  if (probe.source) {
    spdlog::info("{}: block source auto: bpf ({})", options_.deviceId, probe.source->description());
    blockSource_ = std::move(probe.source);
  } else {
    spdlog::info("{}: block source auto: bpf unavailable ({}); using scan", options_.deviceId,
                 probe.unavailableReason);
    blockSource_ = std::make_unique<ScanBlockSource>();
  }
}

void Device::warnIfMissed(const std::string& source, const DirtyUnits& reported, const ImageDelta& delta) {
  if (reported.everything) return;
  std::set<std::uint64_t> seen(reported.units.begin(), reported.units.end());
  std::uint64_t missed = 0;
  for (const auto& unit : delta.units) missed += !seen.count(unit.index);
  // Units of an earlier failed push are expected here too; anything else is a source bug.
  if (missed > 0)
    spdlog::warn("{}: the final scan found {} changed units the {} source did not report since the last "
                 "checkpoint (units of a failed push count here); the final checkpoint carries them",
                 options_.deviceId, missed, source);
}

void Device::startCheckpoints() {
  spdlog::info("{}: active (policy {}, page source {}, block source {}, checkpoint every {} s)", options_.deviceId,
               policyName(spec_.policy), pageSource_->name(), blockSource_->name(), options_.intervalSeconds);
  stopping_ = false;
  if (options_.targetSwitchMs > 0) {
    // The device state of the last switch, if there was one; else what QEMU
    // saves for a small VM, with room to spare.
    std::error_code ec;
    const auto stateBytes = fs::file_size(path("device-state.bin"), ec);
    adaptive_.emplace(std::chrono::milliseconds(options_.targetSwitchMs), options_.intervalSeconds,
                      ec ? std::uint64_t{512 * 1024} : stateBytes);
  }
  lastHarvestNs_ = 0;
  // The first checkpoint of a new VM is the full sync; after a switch the
  // first one is incremental on top of the final checkpoint.
  auto first = pushCheckpoint(applied_ == 0 ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
  inFlight_ = first.fork();
  scheduleCheckpoint();
}

void Device::scheduleCheckpoint() {
  timer_ = checkpointLoop().eagerlyEvaluate([](kj::Exception&& e) { spdlog::error("checkpoint loop: {}", describe(e)); });
}

kj::Promise<void> Device::checkpointLoop() {
  auto delay = static_cast<std::uint64_t>((adaptive_ ? adaptive_->intervalSeconds() : options_.intervalSeconds) * 1e9);
  return whenIdle()
      .then([this, delay] { return io_.provider->getTimer().afterDelay(delay * kj::NANOSECONDS); })
      .then([this]() -> kj::Promise<void> {
        if (stopping_ || role_ != Role::active) return kj::READY_NOW;
        // The full sync again when the first one never reached the server.
        inFlight_ = pushCheckpoint(applied_ == 0 ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL).fork();
        return checkpointLoop();
      });
}

kj::Promise<void> Device::whenIdle() {
  KJ_IF_MAYBE(push, inFlight_) { return push->addBranch(); }
  return kj::READY_NOW;
}

kj::Promise<void> Device::watchTransfer(std::string what, std::uint64_t bytes) {
  RpcConnection* connection = connection_.get();
  return logTransferProgress(io_.provider->getTimer(), kj::mv(what), bytes,
                             [this, connection]() -> std::optional<std::uint64_t> {
                               if (connection_.get() != connection) return std::nullopt;
                               return connection->bytesAcknowledged();
                             })
      .eagerlyEvaluate(nullptr);
}

kj::Promise<void> Device::pushCheckpoint(wire::CheckpointKind kind) {
  if (!session_) {
    spdlog::debug("{}: not connected; the changes wait for the next checkpoint", options_.deviceId);
    return kj::READY_NOW;
  }
  auto pending = std::make_shared<PendingPush>();
  const std::uint64_t t0 = nowNs();
  try {
    DirtyUnits pages = pageSource_->harvest();
    DirtyUnits blocks = blockSource_->harvest();
    if (kind == wire::CheckpointKind::FULL) {
      // The whole image, not only what was written since the VMM started.
      pages = DirtyUnits{.everything = true};
      blocks = DirtyUnits{.everything = true};
    }
    pending->memory = ramTracker_->collect(pages);
    pending->disk = diskTracker_->collect(blocks);
  } catch (const Error& e) {
    spdlog::error("{}: harvest failed: {}", options_.deviceId, e.what());
    return kj::READY_NOW;
  }
  pending->sequence = applied_ + 1;
  const double sinceLastHarvest = lastHarvestNs_ ? static_cast<double>(t0 - lastHarvestNs_) / 1e9 : 0.0;
  lastHarvestNs_ = t0;
  auto request = session_->pushRequest();
  auto checkpoint = request.initCheckpoint();
  checkpoint.setVmId(spec_.vmId);
  checkpoint.setEpoch(epoch_);
  checkpoint.setSequence(pending->sequence);
  checkpoint.setBaseSequence(applied_);
  checkpoint.setKind(kind);
  checkpoint.setPolicy(spec_.policy);
  checkpoint.setOrigin(options_.deviceId);
  checkpoint.setCreatedUnixNs(static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count()));
  toWire(pending->memory, pending->disk, checkpoint);
  holdWhileSending(pending);
  if (kind == wire::CheckpointKind::FULL) {
    auto spec = checkpoint.initSpec();
    spec.setVmId(spec_.vmId);
    spec.setMemoryBytes(spec_.memoryBytes);
    spec.setDiskBytes(spec_.diskBytes);
    spec.setKernelCmdline(spec_.cmdline);
    spec.setAccel(spec_.accel);
    spec.setCpuModel(spec_.cpuModel);
    spec.setPolicy(spec_.policy);
    spec.setVcpus(spec_.vcpus);
    std::string kernel = readWholeFile(path("vmlinuz"), 256u << 20);
    std::string initrd = readWholeFile(path("initrd.img"), 1024u << 20);
    spec.setKernel(kj::arrayPtr(reinterpret_cast<const kj::byte*>(kernel.data()), kernel.size()));
    spec.setInitrd(kj::arrayPtr(reinterpret_cast<const kj::byte*>(initrd.data()), initrd.size()));
  }
  const std::uint64_t harvestNs = nowNs() - t0;
  const std::uint64_t bytes = pending->memory.encodedBytes + pending->disk.encodedBytes;
  const std::uint64_t wireBytes = request.totalSize().wordCount * sizeof(capnp::word);
  auto progress = watchTransfer(fmt::format("{}: checkpoint {}", options_.deviceId, pending->sequence), wireBytes);
  const std::uint64_t sendStart = nowNs();
  return request.send()
      .attach(kj::mv(progress))
      .then(
          [this, pending, kind, harvestNs, bytes, wireBytes, sendStart,
           sinceLastHarvest](capnp::Response<wire::DeviceSession::PushResults>) {
            sent(pending);
            const double sendSeconds = static_cast<double>(nowNs() - sendStart) / 1e9;
            bytesPushed_ += wireBytes;
            if (adaptive_ && kind == wire::CheckpointKind::INCREMENTAL) {
              if (adaptive_->onPush(wireBytes, sinceLastHarvest, harvestNs / 1e9, sendSeconds))
                logAdaptiveInterval(options_.deviceId, *adaptive_, options_.targetSwitchMs,
                                    bytesPushed_);
            }
            ramTracker_->acknowledge(pending->memory);
            diskTracker_->acknowledge(pending->disk);
            saveApplied(pending->sequence);
            if (kind == wire::CheckpointKind::FULL && isOrigPolicy(spec_.policy)) {
              // The full checkpoint is the base that Orig checkpoints are measured against.
              writeBase(pending->memory, pending->disk);
              ramTracker_->setBase(*baseRam_);
              diskTracker_->setBase(*baseDisk_);
            }
            spdlog::info(
                "{}: checkpoint {} ({}) stored: {} pages, {} blocks, {} bytes, harvest {:.1f} ms, "
                "{} bytes pushed and stored in {:.2f} s ({:.2f} Mbit/s)",
                options_.deviceId, pending->sequence,
                kind == wire::CheckpointKind::FULL ? "full" : "incremental",
                pending->memory.units.size(), pending->disk.units.size(), bytes, harvestNs / 1e6,
                wireBytes, sendSeconds, sendSeconds > 0 ? wireBytes * 8 / sendSeconds / 1e6 : 0.0);
          },
          [this, pending](kj::Exception&& e) {
            // Nothing is lost: these units are shipped again with the next checkpoint.
            ramTracker_->retryLater(pending->memory);
            diskTracker_->retryLater(pending->disk);
            // A push made between registering again and settling an earlier
            // unconfirmed one reuses its sequence and is refused: the earlier
            // one is what the server may hold, so it is the one to settle.
            if (!unconfirmed_ || unconfirmed_->sequence != pending->sequence)
              unconfirmed_ = pending;
            spdlog::warn("{}: checkpoint {} not stored ({}); its changes go into the next one",
                         options_.deviceId, pending->sequence, describe(e));
          })
      .eagerlyEvaluate(nullptr);
}

void Device::apply(wire::Checkpoint::Reader checkpoint, wire::DevicePeer::ApplyResults::Builder results) {
  const std::uint64_t start = nowNs();
  if (role_ != Role::standby) fail("device {} is active; it does not apply checkpoints", options_.deviceId);
  const std::uint64_t sequence = checkpoint.getSequence();
  const bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  // Under Orig a checkpoint needs only the base: a device that missed some
  // catches up with the latest alone. Otherwise it must start where this
  // image is (a merged catch-up spans several sequences).
  // A full checkpoint replaces the whole image: the server sends one to a
  // device that is behind the base it compacted its chain into.
  const bool selfContained =
      sequence > applied_ && (full || (isOrigPolicy(checkpoint.getPolicy()) && baseRam_ != nullptr));
  if (!selfContained && (sequence <= applied_ || checkpoint.getBaseSequence() != applied_))
    fail("checkpoint {} (based on {}) does not follow this device's image at {}", sequence,
         checkpoint.getBaseSequence(), applied_);
  if (!full && !ram_) fail("checkpoint {} is incremental but this device has no image yet", sequence);
  if (!full && std::string(checkpoint.getVmId()) != spec_.vmId)
    fail("checkpoint for VM '{}' does not belong to this device's VM '{}'", std::string(checkpoint.getVmId()),
         spec_.vmId);
  // Journal first: a crash in the middle of writing the image is finished
  // from it at the next start, so the image is only ever at whole checkpoints.
  {
    capnp::MallocMessageBuilder copy;
    copy.setRoot(checkpoint);
    writeMessageRecordFile(path("apply.journal"), copy);
  }
  const std::uint64_t journaled = nowNs();
  ApplyStats stats;
  try {
    stats = applyToImage(checkpoint);
  } catch (const Error&) {
    // Nothing to finish: a malformed checkpoint is refused before the image is
    // written, except that a full one has already replaced it.
    if (full) saveApplied(0);
    fs::remove(path("apply.journal"));
    throw;
  }
  fs::remove(path("apply.journal"));
  results.setAppliedSequence(sequence);
  results.setApplyNs(nowNs() - start);
  spdlog::info("{}: applied checkpoint {} ({} pages, {} blocks; journal {:.1f} ms, image {:.1f} ms)",
               options_.deviceId, sequence, stats.memoryUnits, stats.diskUnits, (journaled - start) / 1e6,
               (nowNs() - journaled) / 1e6);
}

ApplyStats Device::applyToImage(wire::Checkpoint::Reader checkpoint) {
  const std::uint64_t sequence = checkpoint.getSequence();
  const bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  if (full) {
    auto spec = checkpoint.getSpec();
    spec_ = specFromWire(spec);
    if (spec_.memoryBytes == 0 || spec_.memoryBytes % kUnitSize || spec_.diskBytes == 0 || spec_.diskBytes % kUnitSize)
      fail("full checkpoint {} has invalid sizes (RAM {}, disk {})", sequence, spec_.memoryBytes, spec_.diskBytes);
    writeFileDurably(path("vmlinuz"), spec.getKernel().begin(), spec.getKernel().size());
    writeFileDurably(path("initrd.img"), spec.getInitrd().begin(), spec.getInitrd().size());
    saveLocalSpec();
    openImages(true);
    damaged_.clear();
  }
  ApplyStats stats = applyCheckpoint(checkpoint, *ram_, *disk_, BaseImage{baseRam_.get(), baseDisk_.get()});
  crashPoint("standby-after-write");
  ram_->sync();
  disk_->sync();
  if (full && isOrigPolicy(spec_.policy)) {
    baseRam_.reset();
    baseDisk_.reset();
    // Durable before the checkpoint counts as applied: Orig checkpoints to
    // come restore from the base, and the journal that would redo this copy
    // after a crash goes once it returns.
    copySparse(path("ram.img"), path("base-ram.img"), /*durable=*/true);
    copySparse(path("disk.img"), path("base-disk.img"), /*durable=*/true);
    openBase();
  }
  if (checkpoint.getKind() == wire::CheckpointKind::FINAL) {
    const std::uint64_t hashStart = nowNs();
    auto ramHashes = hashAllUnits(*ram_);
    auto diskHashes = hashAllUnits(*disk_);
    Digest digest = imageDigest(ramHashes, diskHashes);
    const std::uint64_t hashEnd = nowNs();
    auto expected = asSpan(checkpoint.getImageDigest());
    if (expected.size() != digest.size() || !std::equal(expected.begin(), expected.end(), digest.begin())) {
      damaged_ = fmt::format("image digest mismatch after checkpoint {}: expected {}, this device has {}", sequence,
                             toHex(expected), toHex(digest));
      saveApplied(sequence);
      fail("{}; the image on {} is damaged and the VM will not be resumed here", damaged_, options_.deviceId);
    }
    auto state = checkpoint.getDeviceState();
    writeFileDurably(path("device-state.bin"), state.begin(), state.size());
    std::string seq = std::to_string(sequence);
    writeFileDurably(path("device-state.seq"), seq.data(), seq.size());
    deviceStateSequence_ = sequence;
    verifiedRamHashes_ = std::move(ramHashes);
    verifiedDiskHashes_ = std::move(diskHashes);
    spdlog::info("{}: final checkpoint {}: image digest {} verified ({:.1f} ms to hash the image)",
                 options_.deviceId, sequence, toHex(digest), (hashEnd - hashStart) / 1e6);
  }
  saveApplied(sequence);
  return stats;
}

kj::Promise<void> Device::handOff(std::string target, wire::HandOffResult::Builder result) {
  if (role_ != Role::active || !vm_) fail("device {} is not active", options_.deviceId);
  if (!session_) fail("device {} is not connected to the server", options_.deviceId);
  stopping_ = true;
  timer_ = nullptr;
  const std::uint64_t requested = nowNs();
  return whenIdle().then([this, target, result, requested]() mutable -> kj::Promise<void> {
    spdlog::info("{}: handing off to {} (waited {:.1f} ms for the checkpoint under way)", options_.deviceId, target,
                 (nowNs() - requested) / 1e6);
    std::uint64_t t0 = nowNs();
    vm_->stop();
    std::uint64_t t1 = nowNs();
    // The final checkpoint must be exact whatever the sources: reset them, then
    // compare every unit (the VM is paused) and say if a source missed one.
    DirtyUnits reportedPages = pageSource_->harvest();
    DirtyUnits reportedBlocks = blockSource_->harvest();
    auto pending = std::make_shared<PendingPush>();
    pending->memory = ramTracker_->collect(DirtyUnits{.everything = true});
    pending->disk = diskTracker_->collect(DirtyUnits{.everything = true});
    const ImageDelta& memory = pending->memory;
    const ImageDelta& disk = pending->disk;
    warnIfMissed(pageSource_->name(), reportedPages, memory);
    warnIfMissed(blockSource_->name(), reportedBlocks, disk);
    std::uint64_t t2 = nowNs();
    std::vector<std::byte> state;
    try {
      state = vm_->saveDeviceState();
    } catch (const Error&) {
      vm_->cont();
      stopping_ = false;
      scheduleCheckpoint();
      throw;
    }
    std::uint64_t t3 = nowNs();
    // The digest of the image the receiver will hold: every unit as shipped.
    auto ramHashes = ramTracker_->hashesAfter(memory);
    auto diskHashes = diskTracker_->hashesAfter(disk);
    Digest digest = imageDigest(ramHashes, diskHashes);

    const std::uint64_t sequence = applied_ + 1;
    pending->sequence = sequence;
    auto request = session_->pushRequest();
    auto checkpoint = request.initCheckpoint();
    checkpoint.setVmId(spec_.vmId);
    checkpoint.setEpoch(epoch_);
    checkpoint.setSequence(sequence);
    checkpoint.setBaseSequence(applied_);
    checkpoint.setKind(wire::CheckpointKind::FINAL);
    checkpoint.setPolicy(spec_.policy);
    checkpoint.setOrigin(options_.deviceId);
    toWire(memory, disk, checkpoint);
    holdWhileSending(pending);
    checkpoint.setDeviceState(asCapnp(state));
    checkpoint.setImageDigest(asCapnp(digest));
    const std::uint64_t finalBytes = memory.encodedBytes + disk.encodedBytes + state.size();
    result.setFinalSequence(sequence);
    result.setFinalBytes(finalBytes);
    result.setPauseNs(t1 - t0);
    result.setFinalHarvestNs(t2 - t1);
    result.setDeviceStateSaveNs(t3 - t2);
    auto progress = watchTransfer(fmt::format("{}: final checkpoint {}", options_.deviceId, sequence),
                                  request.totalSize().wordCount * sizeof(capnp::word));
    const std::uint64_t t4 = nowNs();
    return request.send()
        .attach(kj::mv(progress))
        .then(
            [this, result, pending, sequence, t4, digest, state = std::move(state),
             ramHashes = std::move(ramHashes), diskHashes = std::move(diskHashes)](
                capnp::Response<wire::DeviceSession::PushResults>) mutable {
              sent(pending);
              result.setPushNs(nowNs() - t4);
              ramTracker_->acknowledge(pending->memory);
              diskTracker_->acknowledge(pending->disk);
              // The paused VMM writes nothing more; it quits after this answer is on
              // its way (QEMU takes about half a second to exit), off the switch's path.
              // Detaching BPF programs waits for RCU grace periods: that too.
              retiringVm_ = std::move(vm_);
              retiringBlockSource_ = std::move(blockSource_);
              retiringLoop_ = std::move(loop_);
              background_.add(
                  io_.provider->getTimer().afterDelay(200 * kj::MILLISECONDS).then([this] {
                    retireVm();
                    // The VMM's faults cached the images in large folios; a standby
                    // writes them a unit at a time.
                    if (role_ == Role::standby) recacheImages();
                  }));
              pageSource_.reset();
              ram_->sync();
              disk_->sync();
              writeFileDurably(path("device-state.bin"), state.data(), state.size());
              std::string seq = std::to_string(sequence);
              writeFileDurably(path("device-state.seq"), seq.data(), seq.size());
              deviceStateSequence_ = sequence;
              saveApplied(sequence);
              verifiedRamHashes_ = std::move(ramHashes);
              verifiedDiskHashes_ = std::move(diskHashes);
              role_ = Role::standby;
              ramTracker_.reset();
              diskTracker_.reset();
              spdlog::info("{}: final checkpoint {} stored (image digest {}); now a standby",
                           options_.deviceId, sequence, toHex(digest));
            },
            [this, pending](kj::Exception&& e) {
              // The server did not confirm the final checkpoint: keep running here.
              // Should it have stored it after all, the reconnection finds out.
              ramTracker_->retryLater(pending->memory);
              diskTracker_->retryLater(pending->disk);
              unconfirmed_ = pending;
              vm_->cont();
              stopping_ = false;
              scheduleCheckpoint();
              rpcFail(fmt::format(
                  "{} could not store its final checkpoint ({}); the VM goes on running there",
                  options_.deviceId, describe(e)));
            });
  });
}

void Device::retireVm() {
  retiringBlockSource_.reset();
  if (retiringVm_) retiringVm_->quit();
  retiringVm_.reset();
  retiringLoop_.reset();  // after the VMM closed it
}

void Device::activate(std::uint64_t epoch, wire::ActivateResult::Builder result) {
  if (role_ != Role::standby) fail("device {} is already active", options_.deviceId);
  retireVm();  // a VMM that handed off from here must be gone before another uses the image
  if (!damaged_.empty()) fail("{}", damaged_);
  if (!ram_ || deviceStateSequence_ == 0 || deviceStateSequence_ != applied_)
    fail("device {} has no device state for its image at checkpoint {} (it holds state of checkpoint {})",
         options_.deviceId, applied_, deviceStateSequence_);
  if (verifiedRamHashes_.empty()) {
    verifiedRamHashes_ = hashAllUnits(*ram_);
    verifiedDiskHashes_ = hashAllUnits(*disk_);
  }
  std::string state = readWholeFile(path("device-state.bin"), 1u << 30);
  // Trackers first: Diff Prev copies the image as its reference, and that copy
  // must be the final checkpoint's image, taken before the guest runs again.
  prepareActive(epoch, std::move(verifiedRamHashes_), std::move(verifiedDiskHashes_));
  verifiedRamHashes_.clear();
  verifiedDiskHashes_.clear();
  const std::uint64_t t0 = nowNs();
  setUpDisk();
  vm_ = std::make_unique<QemuVm>(vmConfig(true));
  try {
    vm_->loadDeviceState({reinterpret_cast<const std::byte*>(state.data()), state.size()});
  } catch (const Error&) {
    vm_->quit();
    vm_.reset();
    loop_.reset();
    role_ = Role::standby;
    ramTracker_.reset();
    diskTracker_.reset();
    throw;
  }
  attachSources();
  const std::uint64_t t1 = nowNs();
  vm_->cont();
  const std::uint64_t t2 = nowNs();
  result.setDeviceStateLoadNs(t1 - t0);
  result.setResumeNs(t2 - t1);
  spdlog::info("{}: VM resumed from checkpoint {} (lease epoch {})", options_.deviceId, applied_, epoch);
  startCheckpoints();
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
