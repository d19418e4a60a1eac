// The device's own copy of the VM: the RAM and disk images in its state
// directory, what it knows about the VM (vm.json), the sequence its image is
// at, the apply journal and the device state of the last final checkpoint.
//
// A standby writes checkpoints into it; an active device's VMM runs on its
// images. It is at whole checkpoints only: an apply is journaled before the
// image is written and finished from the journal after a crash.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "vmm/image_file.h"
#include "vmsync.capnp.h"

namespace vmsync {

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
  /// The VMM has a virtio-balloon with free page reporting. Part of the VM's
  /// hardware: a VM created before it existed keeps running without it.
  bool freePageReporting = false;
};

/// Per-unit hashes of the RAM and disk images.
struct ImageHashes {
  std::vector<std::uint64_t> ram;
  std::vector<std::uint64_t> disk;
};

class Replica {
 public:
  /// Opens `stateDir` (creating it), loads what was applied there and
  /// finishes an apply a crash interrupted. `deviceId` names the device in logs.
  /// Throws Error when another daemon has the directory (an exclusive flock
  /// on its state.lock, held for the replica's life).
  Replica(const std::string& stateDir, std::string deviceId);
  ~Replica();
  Replica(const Replica&) = delete;
  Replica& operator=(const Replica&) = delete;

  std::string path(const char* name) const { return dir_ + "/" + name; }
  const std::string& dir() const { return dir_; }
  const LocalSpec& spec() const { return spec_; }
  /// The last checkpoint whose changes the image holds (0: none).
  std::uint64_t applied() const { return applied_; }
  /// The lease epoch that checkpoint was made under (0: not known).
  std::uint64_t appliedEpoch() const { return appliedEpoch_; }
  /// The image went on past applied(): a VMM ran on it after that checkpoint
  /// (it is not the chain's image at any checkpoint until a resync).
  bool diverged() const { return diverged_; }
  bool hasImages() const { return ram_ != nullptr; }
  ImageFile& ram() { return *ram_; }
  ImageFile& disk() { return *disk_; }
  /// Orig policies: the base image, once the full checkpoint is applied or acknowledged.
  const ImageFile* baseRam() const { return baseRam_.get(); }
  const ImageFile* baseDisk() const { return baseDisk_.get(); }

  /// A resync from the server (Checkpoint.resync): based on applied(),
  /// whatever the image holds past it, it takes the image to the chain's at
  /// its sequence, which may be lower. Journaled and checked like apply();
  /// a final one must match its digest.
  ApplyStats resync(wire::Checkpoint::Reader checkpoint);
  /// The hash of every unit of the image as it is now (empty: no image).
  ImageHashes currentHashes();

  /// Checks that `checkpoint` follows this image, journals it and writes it.
  /// Throws Error, leaving the image at a whole checkpoint, when it does not fit.
  /// `journaledNs`, if given, is set to the time (nowNs) the journal was durable.
  ApplyStats apply(wire::Checkpoint::Reader checkpoint, std::uint64_t* journaledNs = nullptr);

  /// A new VM from a guest image directory (vm-images/build.sh output): copies
  /// its kernel, initrd and disk, and starts with zero RAM. `accel` is decided
  /// by the caller, with the VMM configuration this replica now describes.
  void createFromImage(const std::string& imageDir, const std::string& vmId, std::uint32_t memoryMb,
                       wire::Policy policy);
  void setAccel(std::string accel);

  /// Records that the server holds checkpoint `sequence` (made under lease
  /// `epoch`) of this image.
  void saveApplied(std::uint64_t sequence, std::uint64_t epoch);
  /// Has the page cache hold the images in 4 KiB folios (ImageFile::recache).
  void recacheImages();
  /// Orig policies: opens the base image files.
  void openBase();
  /// Orig policies: writes the base image from the full checkpoint's units.
  void writeBase(const ImageDelta& memory, const ImageDelta& disk);
  /// The image is at final checkpoint `sequence` (lease `epoch`), whose
  /// device state is `state` and whose units hash to `hashes`: recorded durably.
  void recordFinal(std::uint64_t sequence, std::uint64_t epoch, std::span<const std::byte> state,
                   ImageHashes hashes);

  /// The device state to resume the VM from this image. Throws Error unless the
  /// image is at a final checkpoint that was verified and whose state is here.
  std::string deviceStateForResume() const;
  /// Hashes of the image at the final checkpoint (computed if not kept).
  ImageHashes takeVerifiedHashes();

  /// How a final checkpoint's image digest is checked: from the per-unit
  /// hashes kept current on every apply (the units a checkpoint wrote are
  /// read back and hashed; the cost follows what changed), or by hashing the
  /// whole image (`full`, which also says which units the kept hashes got wrong).
  void setFullVerify(bool full) { fullVerify_ = full; }
  /// The background check of the image against the kept hashes: hashes up to
  /// `units` units from where the last step stopped. Returns the error text
  /// when a unit no longer holds what was applied to it (the image is marked
  /// damaged and diverged, so it is not resumed and the server resyncs it),
  /// else "". Does nothing while no hashes are kept.
  std::string scrubStep(std::uint64_t units);
  /// True while per-unit hashes of the image are kept.
  bool hashesKept() const { return hashesKnown_; }
  /// Hashes the whole image when no hashes are kept (once per start, full
  /// checkpoint or VMM run); true when it did.
  bool ensureHashes();
  /// Completed passes of scrubStep() over the whole image.
  std::uint64_t scrubPasses() const { return scrubPasses_; }
  /// A VMM runs on the images (`live`), or ran and stopped at a final
  /// checkpoint. A replica found live at start-up was left by a VMM that died
  /// past its last checkpoint: its image is diverged.
  void markLive(bool live);
  /// The image went on past its last checkpoint (a fenced VM ran after it):
  /// it is not resumed, and the server resyncs it (recorded durably).
  void markDiverged();
  /// A failover abandoned checkpoints this image holds: forget what was
  /// applied, so the image is synced again from the server's chain.
  void discard();
  /// True when the image is at a verified final checkpoint whose device state is here.
  bool resumable() const {
    return damaged_.empty() && !diverged_ && ram_ && applied_ != 0 && deviceStateSequence_ == applied_;
  }

 private:
  /// Takes the state directory's lock, or says which process holds it.
  void lockDirectory();
  void loadLocalState();
  void redoJournal();
  /// Writes the changes of `checkpoint` (already checked to follow this image)
  /// and records the sequence reached.
  ApplyStats applyToImage(wire::Checkpoint::Reader checkpoint);
  /// A full checkpoint: the VM's spec, kernel and initrd, and empty images.
  void startFromFull(wire::Checkpoint::Reader checkpoint);
  /// A final checkpoint: the image digest must match; keeps the device state.
  void verifyFinal(wire::Checkpoint::Reader checkpoint);
  void saveLocalSpec();
  /// Journals `checkpoint`, writes it and removes the journal.
  ApplyStats journaledApply(wire::Checkpoint::Reader checkpoint, std::uint64_t* journaledNs);
  void clearDiverged();
  void openImages(bool create);

  std::string deviceId_;
  std::string dir_;
  int lockFd_ = -1;  // state.lock, flocked while this replica lives
  LocalSpec spec_;
  bool haveSpec_ = false;
  std::uint64_t applied_ = 0;
  std::uint64_t appliedEpoch_ = 0;
  bool diverged_ = false;
  std::uint64_t deviceStateSequence_ = 0;  // final checkpoint whose device state is kept
  std::string damaged_;                    // set when the image failed verification
  std::unique_ptr<ImageFile> ram_;
  std::unique_ptr<ImageFile> disk_;
  std::unique_ptr<ImageFile> baseRam_;  // Orig policies: the base image
  std::unique_ptr<ImageFile> baseDisk_;
  /// Brings the kept hashes up to date after an apply wrote `stats`' units
  /// (or computes them all when none are kept).
  void updateHashes(const ApplyStats& stats);
  void forgetHashes();

  // Per-unit hashes of the image as it is, kept while no VMM runs on it.
  ImageHashes hashes_;
  bool hashesKnown_ = false;
  bool fullVerify_ = false;
  std::uint64_t updatedUnits_ = 0;  // units the last apply hashed
  std::uint64_t scrubNext_ = 0;  // the unit (RAM then disk) the next scrubStep() starts at
  std::uint64_t scrubPasses_ = 0;
};

}  // namespace vmsync
