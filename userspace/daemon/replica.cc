#include "daemon/replica.h"

#include <capnp/serialize.h>
#include <spdlog/spdlog.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "base/crash_point.h"
#include "base/durable_file.h"
#include "base/error.h"
#include "checkpoint/checkpoint_record.h"
#include "checkpoint/device_state_codec.h"
#include "harvest/unit_hashes.h"
#include "transport/rpc_util.h"
#include "vmm/qemu_vm.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

std::span<const std::byte> asSpan(capnp::Data::Reader data) {
  return {reinterpret_cast<const std::byte*>(data.begin()), data.size()};
}

LocalSpec specFromWire(wire::VmSpec::Reader spec) {
  return LocalSpec{spec.getVmId(), spec.getMemoryBytes(), spec.getDiskBytes(), spec.getKernelCmdline(),
                   spec.getAccel(),  spec.getCpuModel(),    spec.getVcpus(),       spec.getPolicy(),
                   spec.getFreePageReporting()};
}

}  // namespace

Replica::Replica(const std::string& stateDir, std::string deviceId) : deviceId_(std::move(deviceId)) {
  try {
    makePrivateDirectory(stateDir);
  } catch (const Error& e) {
    fail("cannot use state directory {} ({})", stateDir, e.what());
  }
  dir_ = fs::absolute(stateDir).string();
  lockDirectory();
  try {
    loadLocalState();
    redoJournal();
    if (fs::exists(path("vmm-running"))) {
      spdlog::warn("{}: a VMM ran on this image and stopped without a final checkpoint: the image is past "
                   "checkpoint {} by what the guest did since", deviceId_, applied_);
      if (applied_ != 0) markDiverged();
      markLive(false);
    }
  } catch (...) {
    // A constructor that throws runs no destructor: the lock is released here.
    ::close(lockFd_);
    lockFd_ = -1;
    throw;
  }
}

void Replica::markLive(bool live) {
  if (live) {
    writeFileDurably(path("vmm-running"), "1", 1);
  } else if (fs::exists(path("vmm-running"))) {
    fs::remove(path("vmm-running"));
    syncDirectory(dir_);
  }
}

void Replica::markDiverged() {
  if (diverged_) return;
  writeFileDurably(path("diverged"), "1", 1);
  diverged_ = true;
  forgetHashes();
  spdlog::warn("{}: the image went on past checkpoint {}: it is not resumed here before the server resyncs it",
               deviceId_, applied_);
}

Replica::~Replica() {
  if (lockFd_ >= 0) ::close(lockFd_);  // releases the flock
}

void Replica::lockDirectory() {
  const std::string lock = path("state.lock");
  lockFd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (lockFd_ < 0) throwLastErrno(fmt::format("cannot use state directory {}: cannot open {}", dir_, lock));
  if (::flock(lockFd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char holder[32] = {};
    const ssize_t n = ::pread(lockFd_, holder, sizeof holder - 1, 0);
    ::close(lockFd_);
    lockFd_ = -1;
    if (err != EWOULDBLOCK) throwErrno(err, fmt::format("cannot lock state directory {}", dir_));
    fail("state directory {} is in use by another vmsync daemon{}; stop it first, or give this one another --state",
         dir_, n > 0 ? fmt::format(" (pid {})", std::string(holder, static_cast<std::size_t>(n))) : "");
  }
  // Who holds it, for the message above; the lock itself is the flock.
  const std::string pid = std::to_string(::getpid());
  if (::ftruncate(lockFd_, 0) != 0 || ::pwrite(lockFd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size()))
    throwLastErrno(fmt::format("cannot write {}", lock));
}

void Replica::loadLocalState() {
  if (fs::exists(path("applied"))) {
    // "<sequence> <lease epoch>" (the epoch is absent in older state directories).
    std::string text = readWholeFile(path("applied"), 64);
    try {
      std::size_t end = 0;
      applied_ = std::stoull(text, &end);
      if (end < text.size() && text.find_first_not_of(" \n", end) != std::string::npos)
        appliedEpoch_ = std::stoull(text.substr(end));
    } catch (const std::exception&) {
      fail("{} is damaged: '{}' is not a sequence number and lease epoch", path("applied"), text);
    }
  }
  diverged_ = fs::exists(path("diverged"));
  if (fs::exists(path("vm.json"))) {
    try {
      auto j = nlohmann::json::parse(readWholeFile(path("vm.json"), 1 << 20));
      // Sizes are whole numbers: a float or a negative number would be
      // converted with undefined results.
      for (const char* name : {"memory_bytes", "disk_bytes", "vcpus"})
        if (!j.at(name).is_number_unsigned()) fail("{} is damaged: {} is not a whole number", path("vm.json"), name);
      spec_ = LocalSpec{j.at("vm_id"), j.at("memory_bytes"), j.at("disk_bytes"), j.at("cmdline"),
                        j.at("accel"), j.at("cpu_model"),    j.at("vcpus"),     parsePolicy(j.at("policy").get<std::string>()),
                        j.value("free_page_reporting", false)};
      haveSpec_ = true;
    } catch (const nlohmann::json::exception& e) {
      fail("{} is damaged: {}", path("vm.json"), e.what());
    }
  }
  if (fs::exists(path("device-state.seq"))) {
    std::string text = readWholeFile(path("device-state.seq"), 64);
    try {
      deviceStateSequence_ = std::stoull(text);
    } catch (const std::exception&) {
      fail("{} is damaged: '{}' is not a sequence number", path("device-state.seq"), text);
    }
  }
  if (applied_ > 0 && !haveSpec_) fail("{} says checkpoint {} was applied but vm.json is missing", dir_, applied_);
  if (haveSpec_) openImages(false);
  if (haveSpec_ && applied_ > 0 && isOrigPolicy(spec_.policy) && fs::exists(path("base-ram.img"))) openBase();
}

void Replica::redoJournal() {
  const std::string journal = path("apply.journal");
  if (!fs::exists(journal)) return;
  std::string why;
  KJ_IF_MAYBE(words, readRecordFile(journal, why)) {
    // apply() journals only well-formed checkpoints. One that is not (left by
    // an older version, which journaled first) failed before the image was
    // written: it is discarded like a torn one.
    kj::Own<capnp::FlatArrayMessageReader> message;
    KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
      message = kj::heap<capnp::FlatArrayMessageReader>(*words, rpcReaderOptions());
      (void)message->getRoot<wire::Checkpoint>();
    })) {
      why = e->getDescription().cStr();
    } else {
      try {
        checkWellFormed(message->getRoot<wire::Checkpoint>());
      } catch (const Error& e) {
        why = e.what();
      }
    }
    if (!why.empty()) {
      spdlog::warn("{}: discarding an apply journal that is not a well-formed checkpoint ({}); the image was not "
                   "touched", deviceId_, why);
      fs::remove(journal);
      return;
    }
    auto checkpoint = message->getRoot<wire::Checkpoint>();
    // A resync is whole units: finishing it again is harmless.
    if (checkpoint.getResync() || checkpoint.getSequence() > applied_) {
      spdlog::warn("{}: applying checkpoint {} was interrupted (the image is between {} and it); finishing it from "
                   "the journal", deviceId_, checkpoint.getSequence(), applied_);
      std::string failed;
      try {
        applyToImage(checkpoint);
      } catch (const ReferenceMismatch& e) {
        // A reference whose source the interrupted apply had already
        // overwritten: the image is between the two checkpoints, which the
        // server's resync mends from the unit hashes (no start over).
        spdlog::error("{}: cannot finish checkpoint {} ({}); the server resyncs the image", deviceId_,
                      checkpoint.getSequence(), e.what());
        markDiverged();
      } catch (const Error& e) {
        failed = e.what();
      } catch (const kj::Exception& e) {
        // A message that reads past its traversal limit on the second pass
        // (a hostile journal: a well-formed one is read within it).
        failed = e.getDescription().cStr();
      }
      if (!failed.empty()) {
        // The image is neither the old checkpoint nor the new one: start over
        // from the server's base, which replaces all of it.
        spdlog::error("{}: cannot finish checkpoint {} ({}); the image is discarded and will be synced again from "
                      "the server's base", deviceId_, checkpoint.getSequence(), failed);
        saveApplied(0, 0);
      }
    }
  } else {
    // Torn: the crash came while the journal was written, before the image.
    spdlog::info("{}: discarding a torn apply journal ({}); the image was not touched", deviceId_, why);
  }
  fs::remove(journal);
}

void Replica::saveApplied(std::uint64_t sequence, std::uint64_t epoch) {
  std::string text = fmt::format("{} {}", sequence, epoch);
  writeFileDurably(path("applied"), text.data(), text.size());
  applied_ = sequence;
  appliedEpoch_ = epoch;
}

void Replica::saveLocalSpec() {
  nlohmann::json j{{"vm_id", spec_.vmId},   {"memory_bytes", spec_.memoryBytes}, {"disk_bytes", spec_.diskBytes},
                   {"cmdline", spec_.cmdline}, {"accel", spec_.accel},           {"cpu_model", spec_.cpuModel},
                   {"vcpus", spec_.vcpus},     {"policy", policyName(spec_.policy)},
                   {"free_page_reporting", spec_.freePageReporting}};
  std::string text;
  try {
    text = j.dump(2);
  } catch (const nlohmann::json::exception& e) {
    fail("the VM's spec cannot be recorded in {}: its text is not UTF-8 ({})", path("vm.json"), e.what());
  }
  writeFileDurably(path("vm.json"), text.data(), text.size());
  haveSpec_ = true;
}

void Replica::openImages(bool create) {
  ram_.reset();
  disk_.reset();
  if (create) {
    // A full checkpoint describes the whole image on top of zeros.
    fs::remove(path("ram.img"));
    fs::remove(path("disk.img"));
  }
  // Both images or neither: a failure leaves the replica without images.
  auto ram = std::make_unique<ImageFile>(path("ram.img"), true, create ? spec_.memoryBytes : 0);
  auto disk = std::make_unique<ImageFile>(path("disk.img"), true, create ? spec_.diskBytes : 0);
  if (ram->sizeBytes() != spec_.memoryBytes || disk->sizeBytes() != spec_.diskBytes)
    fail("local image in {} does not match the VM: RAM {} / {} bytes, disk {} / {} bytes", dir_, ram->sizeBytes(),
         spec_.memoryBytes, disk->sizeBytes(), spec_.diskBytes);
  ram_ = std::move(ram);
  disk_ = std::move(disk);
  // An image from before may be cached in large folios (a VMM ran on it, or
  // it was copied), which makes every checkpoint's unit writes slower.
  if (!create) recacheImages();
}

void Replica::recacheImages() {
  const std::uint64_t start = nowNs();
  ram_->recache();
  disk_->recache();
  spdlog::info("{}: images recached in 4 KiB pages in {:.0f} ms", deviceId_, (nowNs() - start) / 1e6);
}

void Replica::openBase() {
  baseRam_ = std::make_unique<ImageFile>(path("base-ram.img"), false);
  baseDisk_ = std::make_unique<ImageFile>(path("base-disk.img"), false);
  if (baseRam_->sizeBytes() != spec_.memoryBytes || baseDisk_->sizeBytes() != spec_.diskBytes)
    fail("base image in {} does not match the VM's sizes", dir_);
}

void Replica::writeBase(const ImageDelta& memory, const ImageDelta& disk) {
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

void Replica::createFromImage(const std::string& imageDir, const std::string& vmId, std::uint32_t memoryMb,
                              wire::Policy policy) {
  const fs::path image(imageDir);
  std::uint32_t vcpus = 1;
  if (fs::exists(image / "spec.json")) {
    auto j = nlohmann::json::parse(readWholeFile((image / "spec.json").string(), 1 << 20));
    if (memoryMb == 0) memoryMb = j.value("memory_mb", 0u);
    vcpus = j.value("vcpus", 1u);
    if (vcpus == 0 || vcpus > 64) fail("{}: vcpus must be 1 to 64, not {}", (image / "spec.json").string(), vcpus);
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
  // A VM created now gets free page reporting (docs/architecture.md, "Free pages").
  spec_ = LocalSpec{vmId, std::uint64_t{memoryMb} << 20, fs::file_size(path("disk.img")), cmdline, "", "qemu64",
                    vcpus, policy, true};
  fs::remove(path("base-ram.img"));
  fs::remove(path("base-disk.img"));
  baseRam_.reset();
  baseDisk_.reset();
  if (spec_.diskBytes % kUnitSize != 0) fail("guest disk {} is not a multiple of 4096 bytes", (image / "disk.img").string());
  ram_ = std::make_unique<ImageFile>(path("ram.img"), true, spec_.memoryBytes);
  disk_ = std::make_unique<ImageFile>(path("disk.img"), true);
  saveApplied(0, 0);
  clearDiverged();
}

void Replica::setAccel(std::string accel) {
  spec_.accel = std::move(accel);
  saveLocalSpec();
}

ApplyStats Replica::apply(wire::Checkpoint::Reader checkpoint, std::uint64_t* journaledNs) {
  checkWellFormed(checkpoint);  // before anything reads it, and before it is journaled
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
  return journaledApply(checkpoint, journaledNs);
}

ApplyStats Replica::resync(wire::Checkpoint::Reader checkpoint) {
  checkWellFormed(checkpoint);
  if (!checkpoint.getResync() || checkpoint.getKind() == wire::CheckpointKind::FULL)
    fail("checkpoint {} is not a resync", checkpoint.getSequence());
  if (!ram_) fail("a resync needs an image, and this device has none");
  if (checkpoint.getBaseSequence() != applied_)
    fail("the resync to checkpoint {} is based on {}, but this device's image is at {}", checkpoint.getSequence(),
         checkpoint.getBaseSequence(), applied_);
  if (std::string(checkpoint.getVmId()) != spec_.vmId)
    fail("resync for VM '{}' does not belong to this device's VM '{}'", std::string(checkpoint.getVmId()),
         spec_.vmId);
  return journaledApply(checkpoint, nullptr);
}

ApplyStats Replica::journaledApply(wire::Checkpoint::Reader checkpoint, std::uint64_t* journaledNs) {
  const bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  // Journal first: a crash in the middle of writing the image is finished
  // from it at the next start, so the image is only ever at whole checkpoints.
  {
    capnp::MallocMessageBuilder copy;
    copy.setRoot(checkpoint);
    writeMessageRecordFile(path("apply.journal"), copy);
  }
  if (journaledNs) *journaledNs = nowNs();
  ApplyStats stats;
  try {
    stats = applyToImage(checkpoint);
  } catch (const ReferenceMismatch& e) {
    // Nothing was written, but the image does not hold what the chain says
    // it holds at this checkpoint: the server resyncs it, sending the units
    // that differ (the source of the reference among them).
    fs::remove(path("apply.journal"));
    spdlog::error("{}: checkpoint {} refused: {}", deviceId_, checkpoint.getSequence(), e.what());
    markDiverged();
    throw;
  } catch (const Error&) {
    // Nothing to finish: a malformed checkpoint is refused before the image is
    // written, except that a full one has already replaced it.
    if (full) saveApplied(0, 0);
    fs::remove(path("apply.journal"));
    throw;
  }
  fs::remove(path("apply.journal"));
  return stats;
}

ImageHashes Replica::currentHashes() {
  if (!ram_ || !disk_) return {};
  return ImageHashes{hashAllUnits(*ram_), hashAllUnits(*disk_)};
}

void Replica::clearDiverged() {
  if (!diverged_) return;
  fs::remove(path("diverged"));
  syncDirectory(dir_);
  diverged_ = false;
}

void Replica::startFromFull(wire::Checkpoint::Reader checkpoint) {
  auto spec = checkpoint.getSpec();
  // Checked before it replaces the spec: a refused checkpoint leaves the
  // spec describing the images this device still has.
  const LocalSpec next = specFromWire(spec);
  if (next.memoryBytes == 0 || next.memoryBytes % kUnitSize || next.diskBytes == 0 || next.diskBytes % kUnitSize)
    fail("full checkpoint {} has invalid sizes (RAM {}, disk {})", checkpoint.getSequence(), next.memoryBytes,
         next.diskBytes);
  const LocalSpec previous = spec_;
  spec_ = next;
  try {
    saveLocalSpec();
  } catch (const Error&) {
    spec_ = previous;  // still the spec of the images this device has
    throw;
  }
  writeFileDurably(path("vmlinuz"), spec.getKernel().begin(), spec.getKernel().size());
  writeFileDurably(path("initrd.img"), spec.getInitrd().begin(), spec.getInitrd().size());
  openImages(true);
  damaged_.clear();
}

ApplyStats Replica::applyToImage(wire::Checkpoint::Reader checkpoint) {
  const bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  if (full) startFromFull(checkpoint);
  if (!ram_ || !disk_)
    fail("checkpoint {} is not a full one, and there is no image to apply it to", checkpoint.getSequence());
  if (full) forgetHashes();  // a new image
  ApplyStats stats;
  try {
    stats = applyCheckpoint(checkpoint, *ram_, *disk_, BaseImage{baseRam_.get(), baseDisk_.get()});
    crashPoint("standby-after-write");
    ram_->sync();
    disk_->sync();
  } catch (...) {
    forgetHashes();  // a write that failed part way leaves units the kept hashes do not describe
    throw;
  }
  updateHashes(stats);
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
  if (checkpoint.getKind() == wire::CheckpointKind::FINAL) verifyFinal(checkpoint);
  saveApplied(checkpoint.getSequence(), checkpoint.getEpoch());
  // A full checkpoint replaced the image; a resync made it the chain's.
  if (full || checkpoint.getResync()) {
    clearDiverged();
    damaged_.clear();  // the chain's image now, whatever was found wrong before
  }
  return stats;
}

void Replica::verifyFinal(wire::Checkpoint::Reader checkpoint) {
  const std::uint64_t sequence = checkpoint.getSequence();
  const std::uint64_t hashStart = nowNs();
  std::string how = fmt::format("from the hashes kept on apply, {} units read back", updatedUnits_);
  // Hashes made just now are a whole-image hash already: --full-verify
  // compares the image with kept hashes only when there were some.
  if (ensureHashes()) {
    how = "the whole image hashed: no hashes were kept yet";
  } else if (fullVerify_) {
    ImageHashes whole{hashAllUnits(*ram_), hashAllUnits(*disk_)};
    std::uint64_t wrong = 0;
    for (std::size_t i = 0; i < whole.ram.size(); ++i) wrong += whole.ram[i] != hashes_.ram[i];
    for (std::size_t i = 0; i < whole.disk.size(); ++i) wrong += whole.disk[i] != hashes_.disk[i];
    if (wrong > 0)
      spdlog::error("{}: hashing the whole image found {} not as applied", deviceId_,
                    wrong == 1 ? std::string("1 unit") : fmt::format("{} units", wrong));
    hashes_ = std::move(whole);
    how = "the whole image hashed";
  }
  Digest digest = imageDigest(hashes_.ram, hashes_.disk);
  const std::uint64_t hashEnd = nowNs();
  auto expected = asSpan(checkpoint.getImageDigest());
  if (expected.size() != digest.size() || !std::equal(expected.begin(), expected.end(), digest.begin())) {
    damaged_ = fmt::format("image digest mismatch after checkpoint {} ({}): expected {}, this device has {}",
                           sequence, how, toHex(expected), toHex(digest));
    saveApplied(sequence, checkpoint.getEpoch());
    fail("{}; the image on {} is damaged and the VM will not be resumed here", damaged_, deviceId_);
  }
  const std::vector<std::byte> state = deviceStateOf(checkpoint);
  writeFileDurably(path("device-state.bin"), state.data(), state.size());
  std::string seq = std::to_string(sequence);
  writeFileDurably(path("device-state.seq"), seq.data(), seq.size());
  deviceStateSequence_ = sequence;
  spdlog::info("{}: final checkpoint {}: image digest {} verified ({:.1f} ms, {})", deviceId_, sequence,
               toHex(digest), (hashEnd - hashStart) / 1e6, how);
}

void Replica::forgetHashes() {
  hashesKnown_ = false;
  hashes_ = {};
  scrubNext_ = 0;
}

bool Replica::ensureHashes() {
  if (hashesKnown_ || !ram_ || !disk_) return false;
  // Once per image (after a start, a full checkpoint or a VMM's run): the
  // applies that follow, and the final checkpoint's check, cost what they write.
  const std::uint64_t start = nowNs();
  hashes_ = ImageHashes{hashAllUnits(*ram_), hashAllUnits(*disk_)};
  hashesKnown_ = true;
  scrubNext_ = 0;
  updatedUnits_ = hashes_.ram.size() + hashes_.disk.size();
  spdlog::info("{}: hashed the whole image for the checks to come ({:.0f} ms)", deviceId_, (nowNs() - start) / 1e6);
  return true;
}

void Replica::updateHashes(const ApplyStats& stats) {
  // Not kept yet: ensureHashes() makes them, off the apply (the device calls
  // it after answering), or the final checkpoint's check does.
  if (!hashesKnown_) return;
  // Read back from the file, not taken from the checkpoint: what counts is what the image holds.
  for (const std::uint64_t i : stats.ramWritten) hashes_.ram[i] = hashUnit(ram_->unit(i));
  for (const std::uint64_t i : stats.diskWritten) hashes_.disk[i] = hashUnit(disk_->unit(i));
  updatedUnits_ = stats.ramWritten.size() + stats.diskWritten.size();
}

std::string Replica::scrubStep(std::uint64_t units) {
  if (!hashesKnown_ || !ram_ || !damaged_.empty()) return {};
  const std::uint64_t ramUnits = hashes_.ram.size();
  const std::uint64_t total = ramUnits + hashes_.disk.size();
  const std::uint64_t end = std::min(total, scrubNext_ + units);
  for (std::uint64_t i = scrubNext_; i < end; ++i) {
    const bool inRam = i < ramUnits;
    const std::uint64_t index = inRam ? i : i - ramUnits;
    const std::uint64_t kept = inRam ? hashes_.ram[index] : hashes_.disk[index];
    if (hashUnit(inRam ? ram_->unit(index) : disk_->unit(index)) == kept) continue;
    damaged_ = fmt::format("the image is damaged: {} unit {} no longer holds what checkpoint {} left there "
                           "(found by the background check)",
                           inRam ? "RAM" : "disk", index, applied_);
    spdlog::error("{}: {}; it is not resumed here, and the server resyncs it", deviceId_, damaged_);
    markDiverged();
    return damaged_;
  }
  scrubNext_ = end == total ? 0 : end;
  if (end == total) ++scrubPasses_;
  return {};
}

void Replica::recordFinal(std::uint64_t sequence, std::uint64_t epoch, std::span<const std::byte> state,
                          ImageHashes hashes) {
  ram_->sync();
  disk_->sync();
  writeFileDurably(path("device-state.bin"), state.data(), state.size());
  std::string seq = std::to_string(sequence);
  writeFileDurably(path("device-state.seq"), seq.data(), seq.size());
  deviceStateSequence_ = sequence;
  saveApplied(sequence, epoch);
  hashes_ = std::move(hashes);
  hashesKnown_ = true;
  scrubNext_ = 0;
}

std::string Replica::deviceStateForResume() const {
  if (!damaged_.empty()) fail("{}", damaged_);
  if (diverged_)
    fail("device {} cannot resume the VM: its image went on past checkpoint {} and waits for the server's resync",
         deviceId_, applied_);
  if (!ram_ || deviceStateSequence_ == 0 || deviceStateSequence_ != applied_)
    fail("device {} has no device state for its image at checkpoint {} (it holds state of checkpoint {})",
         deviceId_, applied_, deviceStateSequence_);
  return readWholeFile(path("device-state.bin"), 1u << 30);
}

void Replica::discard() {
  fs::remove(path("device-state.bin"));
  fs::remove(path("device-state.seq"));
  deviceStateSequence_ = 0;
  forgetHashes();
  damaged_.clear();
  saveApplied(0, 0);
  clearDiverged();
  spdlog::warn("{}: the image is discarded; it is synced again from the server's chain", deviceId_);
}

ImageHashes Replica::takeVerifiedHashes() {
  if (!hashesKnown_) hashes_ = ImageHashes{hashAllUnits(*ram_), hashAllUnits(*disk_)};
  // A VMM is about to run on the image: the hashes go with it.
  ImageHashes taken = std::move(hashes_);
  forgetHashes();
  return taken;
}

}  // namespace vmsync
