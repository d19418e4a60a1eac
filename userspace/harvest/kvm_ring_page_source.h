// The `kvm-ring` page source: KVM's own per-vCPU dirty ring, for a VMM that
// cooperates (hands over its VM fd and the vCPUs' ring mappings), such as the
// tests' minimal VMM. Each entry names a (memory slot, page offset) the guest
// wrote; harvesting marks entries for reset and asks KVM to re-protect them.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <map>
#include <vector>

#include "harvest/dirty_source.h"

namespace vmsync {

/// One vCPU's dirty ring as mapped from its fd.
struct KvmDirtyRing {
  kvm_dirty_gfn* entries = nullptr;  // mmap of the vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET pages
  std::uint32_t size = 0;            // entries (a power of two)
  std::uint32_t next = 0;            // next entry to look at (the consumer's index)
};

class KvmRingPageSource final : public PageSource {
 public:
  /// `vmFd`: the VM (for KVM_RESET_DIRTY_RINGS). `slotFirstUnit`: for each
  /// memory slot id, the unit index of its first page in the harvested image.
  KvmRingPageSource(int vmFd, std::vector<KvmDirtyRing*> rings, std::map<std::uint32_t, std::uint64_t> slotFirstUnit);

  std::string name() const override { return "kvm-ring"; }
  /// Collects every dirty entry of every ring, marks them for reset and has
  /// KVM re-arm those pages. Throws Error if KVM refuses the reset.
  DirtyUnits harvest() override;

 private:
  int vmFd_;
  std::vector<KvmDirtyRing*> rings_;
  std::map<std::uint32_t, std::uint64_t> slotFirstUnit_;
};

/// Ring size to ask KVM for, in bytes, for `entries` entries (a power of two).
inline std::uint32_t kvmDirtyRingBytes(std::uint32_t entries) { return entries * sizeof(kvm_dirty_gfn); }

}  // namespace vmsync
