// The `kmod` page source: vmsync.ko harvests the dirty log of a VM that
// belongs to another, unmodified VMM (QEMU). The source takes the VM's file
// from the VMM with pidfd_getfd(2), hands it to /dev/vmsync, and reads the
// guest frame numbers the module publishes into a ring shared by mmap.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "harvest/dirty_source.h"

namespace vmsync {

/// Guest frames [firstGfn, firstGfn + pages) are units [firstUnit, ...) of
/// the harvested image. Frames outside every range are not in the image
/// (video memory, ROMs) and are dropped.
struct GfnRange {
  std::uint64_t firstGfn = 0;
  std::uint64_t pages = 0;
  std::uint64_t firstUnit = 0;
};

/// Where QEMU's q35 machine puts `ramBytes` of RAM in guest-physical space:
/// RAM below 4 GiB up to its low-memory limit, the rest from 4 GiB.
std::vector<GfnRange> qemuQ35GfnRanges(std::uint64_t ramBytes);

/// The fd number, in process `pid`'s table, of its KVM VM (the link
/// anon_inode:kvm-vm under /proc/PID/fd), or -1 if it has none.
int findKvmVmFd(pid_t pid);

class KmodPageSource final : public PageSource {
 public:
  /// Why this machine cannot use the module ("" if it can): /dev/vmsync
  /// missing, or a module with another ABI or without VMM-write tracking.
  static std::string unavailableReason();

  /// Attaches to the KVM VM of process `vmmPid`. `ringEntries` 0 takes the
  /// module's default. Throws Error saying what failed (no KVM VM in that
  /// process, pidfd_getfd refused, the module refused the VM and why: the
  /// VMM logs a slot itself, guest RAM is not a shared file mapping).
  KmodPageSource(pid_t vmmPid, std::vector<GfnRange> ranges, std::uint32_t ringEntries = 0);
  /// Detaches (the module restores the VM's slots) and unmaps the ring.
  ~KmodPageSource();
  KmodPageSource(const KmodPageSource&) = delete;
  KmodPageSource& operator=(const KmodPageSource&) = delete;

  std::string name() const override { return "kmod"; }
  std::string counters() const override;
  /// Has the module read and re-arm KVM's dirty log, then drains the ring.
  /// A full ring or slots the VMM changed turn into `everything`. Throws
  /// Error when the VMM is gone or the module fails.
  DirtyUnits harvest() override;
  /// vmsync.ko reports the VMM's own writes too (VMSYNC_FEATURE_VMM_WRITES,
  /// which unavailableReason() requires).
  bool reportsEveryWrite() const override { return true; }
  /// A harvest that re-arms KVM's log and keeps only the VMM's writes, for the
  /// next harvest: the VM did not run since the last one, so what KVM's log
  /// holds after QEMU's migration turned it off and the module on again is
  /// not writes, and nothing went unlogged (no rescan). A full ring still
  /// rescans.
  /// Only while the VM is paused (the daemon has no use for it with QEMU
  /// 7.2: kmod/README.md).
  void rearmWhilePaused();

  /// Detaches now, with the VM running; harvest() then throws.
  void detach();
  /// Memory slots the module follows (from the attach).
  std::uint32_t slots() const { return slots_; }
  /// Pages the last harvest found written by the VMM itself (through its
  /// mapping of guest RAM) and not in KVM's log; counters() gives the count
  /// since the attach.
  std::uint64_t lastVmmWritten() const { return lastVmmWritten_; }
  /// Of the last harvest's pages, those with an I/O in flight into them
  /// (someone holds them beyond their mappings): the module reports them
  /// again in the next harvest.
  std::uint64_t lastVmmBusy() const { return lastVmmBusy_; }

 private:
  /// A harvest asking the module for `ask` (VMSYNC_HARVEST_PAUSED or 0).
  DirtyUnits harvest(std::uint32_t ask);

  int device_ = -1;
  pid_t vmmPid_;
  void* ring_ = nullptr;
  std::size_t ringBytes_ = 0;
  std::uint32_t slots_ = 0;
  std::uint64_t lastVmmWritten_ = 0;
  std::uint64_t lastVmmBusy_ = 0;
  DirtyUnits carried_;  // found by rearmWhilePaused(), for the next harvest
  std::uint64_t vmmWritten_ = 0;
  std::vector<GfnRange> ranges_;
};

}  // namespace vmsync
