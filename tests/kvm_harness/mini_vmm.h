// A minimal KVM VMM for tests: one vCPU put straight into 64-bit long mode,
// running a bare guest that writes a known, changing set of pages each round
// and reports the end of every round with an OUT to port 0x10.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>

#include "harvest/kvm_ring_page_source.h"

namespace vmsync::testing {

class MiniVmm {
 public:
  /// Guest memory layout (one slot from GPA 0): page tables, GDT, code, then
  /// kDataPages data pages from kDataStart.
  static constexpr std::uint64_t kMemoryBytes = 4u << 20;
  static constexpr std::uint64_t kDataStart = 1u << 20;
  static constexpr std::uint64_t kDataPages = 512;

  /// How to build the VM; the defaults are the invariant tests' guest.
  struct Options {
    /// Entries per vCPU of KVM's dirty ring; 0 leaves the ring off.
    std::uint32_t ringEntries = 0;
    /// Guest memory: a multiple of 2 MiB, at most 1 GiB.
    std::uint64_t memoryBytes = kMemoryBytes;
    /// 0: the round pattern of pagesWrittenIn(). Otherwise every round
    /// writes the round number into one byte every `strideBytes` from
    /// kDataStart to the end of memory (a page-aligned stride).
    std::uint64_t strideBytes = 0;
    /// Guest memory in a memfd mapped shared, as QEMU's shared RAM file, so
    /// that another process can map it too (see memoryFd()).
    bool sharedMemory = false;
    /// Guest memory in this file instead, created and mapped shared (a file
    /// on hugetlbfs, or on tmpfs mounted with huge=always); see memoryFd().
    std::string memoryPath;
  };

  /// Opens /dev/kvm and builds the VM; with `ringEntries` > 0 KVM's dirty
  /// ring is enabled with that many entries per vCPU. Throws Error saying
  /// what KVM refused.
  explicit MiniVmm(std::uint32_t ringEntries);
  explicit MiniVmm(const Options& options);
  ~MiniVmm();

  /// Why this machine cannot run the harness ("" if it can).
  static std::string unavailableReason();

  /// Runs the guest until it finishes its next round; returns the round number.
  std::uint64_t runRound();

  /// Data pages (as unit indexes from GPA 0) the guest writes in `round`: page i
  /// when (i * 7 + round) % 5 == 0, for i not a multiple of 3 (those are never written).
  static std::set<std::uint64_t> pagesWrittenIn(std::uint64_t round);
  /// True for data pages the guest never writes.
  static bool neverWritten(std::uint64_t unit);

  /// The dirty ring source over this VM's vCPU (only with `ringEntries` > 0).
  KvmRingPageSource& ringSource() { return *source_; }
  /// The VM's fd, for tests that query KVM about the VM directly.
  int vmFd() const { return vm_; }
  /// Rewrites the VM's one memory slot with `flags` (KVM_MEM_*), as a VMM
  /// does when it turns dirty logging on or off. Throws Error if KVM refuses.
  void setSlotFlags(std::uint32_t flags);
  /// The file holding guest memory (Options::sharedMemory or memoryPath), else -1.
  int memoryFd() const { return memoryFd_; }
  std::uint64_t memoryBytes() const { return memoryBytes_; }
  /// The byte the guest last stored in data page `unit` (the round number).
  std::uint8_t dataByte(std::uint64_t unit) const { return memory_[unit * 4096]; }
  /// Writes `value` into page `unit` through the VMM's own mapping, as a
  /// device model writes guest RAM (not at the byte the guest writes).
  void writeAsVmm(std::uint64_t unit, std::uint8_t value) { memory_[unit * 4096 + 123] = value; }

 private:
  void setUpLongMode();

  int kvm_ = -1, vm_ = -1, vcpu_ = -1, memoryFd_ = -1;
  std::uint64_t memoryBytes_ = kMemoryBytes;
  std::uint64_t strideBytes_ = 0;
  std::uint8_t* memory_ = nullptr;
  void* run_ = nullptr;
  std::size_t runSize_ = 0;
  KvmDirtyRing ring_;
  std::unique_ptr<KvmRingPageSource> source_;
};

}  // namespace vmsync::testing
