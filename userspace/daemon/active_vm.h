// The active side of a device: the VMM running on the replica's images, the
// sources that say what it changed, the trackers that turn that into
// checkpoints, and the loop that ships them through the server link.
#pragma once

#include <kj/async-io.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/adaptive_interval.h"
#include "checkpoint/checkpoint_builder.h"
#include "daemon/device.h"
#include "daemon/device_metrics.h"
#include "daemon/replica.h"
#include "daemon/server_link.h"
#include "harvest/dirty_source.h"
#include "harvest/unit_hashes.h"
#include "vmm/loop_device.h"
#include "vmm/qemu_vm.h"

namespace vmsync {

/// The VMM configuration for the replica's images (`loop`: the disk's loop
/// device, or nullptr for the image file).
VmConfig vmConfigFor(const DeviceOptions& options, const Replica& replica, const LoopDevice* loop, bool incoming);

/// A paused VMM that handed its VM off, with what it used: it quits off the
/// switch's path (QEMU takes about half a second to exit, and detaching BPF
/// programs waits for RCU grace periods).
struct RetiredVmm {
  std::unique_ptr<QemuVm> vm;
  std::unique_ptr<BlockSource> blockSource;
  std::unique_ptr<LoopDevice> loop;  // after the VMM closed it
  /// Quits the VMM and lets go of the rest, in that order.
  void quit();
};

/// What a stored final checkpoint leaves behind on the device that made it.
struct FinalCheckpoint {
  std::uint64_t sequence = 0;
  std::vector<std::byte> deviceState;
  ImageHashes hashes;  // of the image the receivers hold now
  Digest digest{};
};

class ActiveVm {
 public:
  /// Takes the active role under lease `epoch` over the replica's image, which
  /// the receivers hold as `receiverHashes`. Starts nothing yet.
  ActiveVm(kj::AsyncIoContext& io, const DeviceOptions& options, Replica& replica, ServerLink& link,
           std::uint64_t epoch, ImageHashes receiverHashes, DeviceMetrics& metrics);
  ~ActiveVm();

  /// Boots the replica's VM from its kernel and starts shipping checkpoints.
  void boot();
  /// Starts the VMM on the replica's image with the device state `state`,
  /// resumes the VM and starts shipping checkpoints.
  void resume(std::span<const std::byte> state, wire::ActivateResult::Builder result);
  /// Pauses the VM and pushes the final checkpoint: the remaining changes,
  /// the device state and the image digest. On success the VM stays paused
  /// (retire() it); on failure it runs on and the error says why.
  kj::Promise<FinalCheckpoint> handOff(std::string target, wire::HandOffResult::Builder result);
  /// After a reconnection: settles a push whose answer was lost and checks
  /// that the lease is still this device's.
  kj::Promise<void> rejoin(Registration registered);
  /// Hands over the paused VMM after a stored final checkpoint.
  RetiredVmm retire();

  std::uint64_t epoch() const { return epoch_; }
  /// True once this device learned that the lease moved on: its VM is paused
  /// for good and nothing more is pushed.
  bool fenced() const { return fenced_; }
  /// The lease moved on (`why`): pauses the VM at once and keeps it paused.
  void fence(const std::string& why);

 private:
  /// --disk loop: attaches the disk image to a loop device for the VMM.
  void setUpDisk();
  /// Starts the page and block sources for the VMM just started (still paused).
  void attachSources();
  void attachPageSource();
  void attachBlockSource();
  /// Logs units the final scan found that `source` had not reported; returns
  /// how many.
  std::uint64_t warnIfMissed(const std::string& source, const DirtyUnits& reported, const ImageDelta& delta);
  /// Ships the first checkpoint and starts the incremental loop.
  void startCheckpoints();
  /// Starts the incremental checkpoint loop (replacing any previous one).
  void scheduleCheckpoint();
  kj::Promise<void> checkpointLoop();
  kj::Promise<void> whenIdle();
  kj::Promise<void> pushCheckpoint(wire::CheckpointKind kind);
  /// Everything a checkpoint of this VM says about itself, but its chunks.
  void describeCheckpoint(wire::Checkpoint::Builder checkpoint, wire::CheckpointKind kind,
                          std::uint64_t sequence) const;
  void attachSpec(wire::Checkpoint::Builder checkpoint) const;
  void onPushStored(const PendingPush& pending, wire::CheckpointKind kind, std::uint64_t wireBytes,
                    double sinceLastHarvest, std::uint64_t harvestNs, std::uint64_t sendStart);
  void onPushFailed(const std::shared_ptr<PendingPush>& pending, const kj::Exception& e);
  /// The final checkpoint's harvest with the VM paused: every unit compared.
  /// Without `encodeNow` the changed units are only copied: the caller
  /// encodes them (ImageTracker::encode) once the VM runs again.
  PendingPush harvestEverything(bool encodeNow = true);
  /// Pauses the VM, harvests every change and saves the device state into
  /// `pending` and `final`; on failure the VM runs on and nothing is lost.
  void pauseForFinal(PendingPush& pending, FinalCheckpoint& final, wire::HandOffResult::Builder result);
  kj::Promise<FinalCheckpoint> pushFinal(wire::DeviceSession::Client session, std::shared_ptr<PendingPush> pending,
                                         std::shared_ptr<FinalCheckpoint> final, wire::HandOffResult::Builder result);

  /// A consistent checkpoint of the running VM: paused while its exact
  /// changes and device state are taken, resumed, then shipped.
  kj::Promise<void> pushResumablePoint();
  /// Renews the lease every quarter of the server's lease timeout; pauses the
  /// VM when it could not for a whole timeout, resumes it once it can again.
  kj::Promise<void> renewLoop();
  void leaseRenewed();
  /// Undoes a pause that did not end in a stored final checkpoint.
  void runOn();
  /// Sets the trackers' compression for the next checkpoint: --compression,
  /// or under auto the selector's choice (logged when it changes).
  void chooseCompression();
  /// Tells the selector what encoding `pending` cost.
  void noteEncoded(const PendingPush& pending);

  kj::AsyncIoContext& io_;
  const DeviceOptions& options_;
  DeviceMetrics& metrics_;
  Replica& replica_;
  ServerLink& link_;
  std::uint64_t epoch_;

  std::unique_ptr<LoopDevice> loop_;  // --disk loop: the block device the VMM writes
  std::unique_ptr<QemuVm> vm_;
  std::unique_ptr<PageSource> pageSource_;
  std::unique_ptr<BlockSource> blockSource_;
  std::unique_ptr<ImageTracker> ramTracker_;
  std::unique_ptr<ImageTracker> diskTracker_;

  bool stopping_ = false;                        // no new incremental checkpoints
  bool fenced_ = false;                          // the lease moved on: paused for good
  bool pausedForHandOff_ = false;                // a final checkpoint is on its way
  bool selfPaused_ = false;                      // paused: the lease could not be renewed in time
  std::uint64_t lastRenewedNs_ = 0;              // the server last confirmed the lease (renewal or push)
  std::uint64_t lastResumableNs_ = 0;            // the last resumable point was taken
  kj::Maybe<kj::Promise<void>> renewals_;
  kj::Maybe<kj::Promise<void>> timer_;           // next incremental checkpoint
  kj::Maybe<kj::ForkedPromise<void>> inFlight_;  // push under way
  // Work that captures this object and that someone else may hold on to (a
  // server's handOff call waits on the push under way, and so keeps it): all
  // of it is cancelled when this object goes, before any member does.
  kj::Canceler canceler_;
  std::optional<AdaptiveInterval> adaptive_;     // --target-switch-ms
  std::optional<CompressionSelector> compressionSelector_;  // --compression auto
  bool compressionChosen_ = false;               // chooseCompression() ran (and logged) once
  std::uint64_t lastHarvestNs_ = 0;              // of the previous checkpoint, for the guest's dirty rate
  std::uint64_t bytesPushed_ = 0;                // since this device became active: the link's share of the cost
  double lastPushCpuSeconds_ = 0;                // process CPU time at the last push, for the energy estimate
};

}  // namespace vmsync
