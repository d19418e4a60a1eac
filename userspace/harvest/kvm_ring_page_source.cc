#include "harvest/kvm_ring_page_source.h"

#include <sys/ioctl.h>

#include <atomic>

#include "base/error.h"

namespace vmsync {

KvmRingPageSource::KvmRingPageSource(int vmFd, std::vector<KvmDirtyRing*> rings,
                                     std::map<std::uint32_t, std::uint64_t> slotFirstUnit)
    : vmFd_(vmFd), rings_(std::move(rings)), slotFirstUnit_(std::move(slotFirstUnit)) {
  for (const auto* ring : rings_)
    if (ring->size == 0 || (ring->size & (ring->size - 1)) != 0)
      fail("KVM dirty ring of {} entries: the size must be a power of two", ring->size);
}

DirtyUnits KvmRingPageSource::harvest() {
  DirtyUnits out;
  for (auto* ring : rings_) {
    while (true) {
      kvm_dirty_gfn& entry = ring->entries[ring->next & (ring->size - 1)];
      // KVM publishes an entry by setting DIRTY last: read the flags first,
      // with acquire order, then the slot and offset.
      std::uint32_t flags = std::atomic_ref<std::uint32_t>(entry.flags).load(std::memory_order_acquire);
      if ((flags & KVM_DIRTY_GFN_F_DIRTY) == 0) break;
      auto slot = slotFirstUnit_.find(entry.slot & 0xffff);
      if (slot == slotFirstUnit_.end()) {
        out.everything = true;
        out.rescanReason = fmt::format("KVM dirty ring names unknown memory slot {}", entry.slot);
      } else {
        out.units.push_back(slot->second + entry.offset);
      }
      // Hand the entry back: KVM re-protects the page at the reset below.
      std::atomic_ref<std::uint32_t>(entry.flags).store(KVM_DIRTY_GFN_F_RESET, std::memory_order_release);
      ++ring->next;
    }
  }
  if (::ioctl(vmFd_, KVM_RESET_DIRTY_RINGS) < 0) throwLastErrno("KVM_RESET_DIRTY_RINGS");
  return out;
}

}  // namespace vmsync
