#include "harvest/kmod_page_source.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include "base/error.h"
#include "kmod/uapi/vmsync.h"

namespace vmsync {

namespace {

// The q35 machine keeps RAM below this address when it is all that large.
constexpr std::uint64_t kQ35LowMemoryLimit = 0xb0000000;
constexpr std::uint64_t kQ35LowMemoryWhenLarger = 0x80000000;
constexpr std::uint64_t kFourGiB = 1ull << 32;
constexpr std::uint64_t kPage = 4096;

// What the module's refusal of an attach means, for the user.
std::string refusalReason(const vmsync_attach& attach) {
  const std::string where = fmt::format("the memory slot at guest address {:#x}", attach.refused_gpa);
  switch (attach.refused) {
    case VMSYNC_REFUSED_DIRTY_RING:
      return "the VM uses KVM's dirty ring, which has no dirty bitmap to read";
    case VMSYNC_REFUSED_VMM_LOGS:
      return fmt::format("the VMM already logs {} itself (a migration under way?); reading that log would take "
                         "its pages from the VMM",
                         where);
    case VMSYNC_REFUSED_RAM_NOT_SHARED:
      return fmt::format("guest RAM of {} is not a shared file mapping, so the VMM's own writes to it cannot be "
                         "followed (run QEMU with memory-backend-file,share=on, as vmsync does)",
                         where);
    case VMSYNC_REFUSED_HUGETLB:
      return fmt::format("guest RAM of {} is on hugetlbfs, where the VMM's own writes cannot be followed", where);
    default:
      return "";
  }
}

int pidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
int pidfdGetfd(int pidfd, int fd) {
  return static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, fd, 0));
}

}  // namespace

std::vector<GfnRange> qemuQ35GfnRanges(std::uint64_t ramBytes) {
  const std::uint64_t low = ramBytes >= kQ35LowMemoryLimit ? kQ35LowMemoryWhenLarger : ramBytes;
  std::vector<GfnRange> ranges{{.firstGfn = 0, .pages = low / kPage, .firstUnit = 0}};
  if (ramBytes > low)
    ranges.push_back({.firstGfn = kFourGiB / kPage,
                      .pages = (ramBytes - low) / kPage,
                      .firstUnit = low / kPage});
  return ranges;
}

int findKvmVmFd(pid_t pid) {
  const std::string dir = fmt::format("/proc/{}/fd", pid);
  DIR* fds = ::opendir(dir.c_str());
  if (!fds) return -1;
  int found = -1;
  while (dirent* entry = ::readdir(fds)) {
    char target[64];
    const std::string link = dir + "/" + entry->d_name;
    ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    target[n] = '\0';
    if (std::strcmp(target, "anon_inode:kvm-vm") == 0) {
      found = std::atoi(entry->d_name);
      break;
    }
  }
  ::closedir(fds);
  return found;
}

std::string KmodPageSource::unavailableReason() {
  int fd = ::open(VMSYNC_DEVICE_PATH, O_RDWR | O_CLOEXEC);
  if (fd < 0)
    return fmt::format("{}: {} (is vmsync.ko loaded?)", VMSYNC_DEVICE_PATH, std::strerror(errno));
  vmsync_version version{};
  std::string reason;
  if (::ioctl(fd, VMSYNC_IOC_GET_VERSION, &version) < 0)
    reason = fmt::format("VMSYNC_IOC_GET_VERSION: {}", std::strerror(errno));
  else if (version.abi_version != VMSYNC_ABI_VERSION)
    reason = fmt::format("vmsync.ko speaks ABI {}, this controller {}", version.abi_version,
                         VMSYNC_ABI_VERSION);
  else if ((version.features & VMSYNC_FEATURE_RING) == 0)
    reason = "vmsync.ko has no gfn ring";
  else if ((version.features & VMSYNC_FEATURE_VMM_WRITES) == 0)
    reason = "vmsync.ko does not report the VMM's own writes to guest RAM (a module older than this controller)";
  ::close(fd);
  return reason;
}

KmodPageSource::KmodPageSource(pid_t vmmPid, std::vector<GfnRange> ranges,
                               std::uint32_t ringEntries)
    : vmmPid_(vmmPid), ranges_(std::move(ranges)) {
  const int remoteFd = findKvmVmFd(vmmPid);
  if (remoteFd < 0)
    fail("process {} has no KVM VM open (no anon_inode:kvm-vm in /proc/{}/fd)", vmmPid, vmmPid);
  const int pidfd = pidfdOpen(vmmPid);
  if (pidfd < 0) throwLastErrno(fmt::format("pidfd_open({})", vmmPid));
  const int vmFd = pidfdGetfd(pidfd, remoteFd);
  const int getfdErrno = errno;
  ::close(pidfd);
  if (vmFd < 0)
    throwErrno(getfdErrno, fmt::format("pidfd_getfd of process {}'s VM fd {}", vmmPid, remoteFd));

  device_ = ::open(VMSYNC_DEVICE_PATH, O_RDWR | O_CLOEXEC);
  if (device_ < 0) {
    const int err = errno;
    ::close(vmFd);
    throwErrno(err, fmt::format("cannot open {}", VMSYNC_DEVICE_PATH));
  }
  vmsync_attach attach{};
  attach.vm_fd = vmFd;
  attach.ring_entries = ringEntries;
  const int r = ::ioctl(device_, VMSYNC_IOC_ATTACH, &attach);
  const int attachErrno = errno;
  // The module holds its own reference to the VM from here on.
  ::close(vmFd);
  if (r < 0) {
    ::close(device_);
    const std::string why = refusalReason(attach);
    if (!why.empty()) fail("vmsync.ko refused to attach to process {}'s VM: {}", vmmPid, why);
    throwErrno(attachErrno, fmt::format("vmsync.ko cannot attach to process {}'s VM", vmmPid));
  }
  slots_ = attach.slots;
  ringBytes_ = attach.ring_bytes;
  ring_ = ::mmap(nullptr, ringBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, device_, 0);
  if (ring_ == MAP_FAILED) {
    const int err = errno;
    ring_ = nullptr;
    ::close(device_);  // detaches
    throwErrno(err, "cannot map vmsync.ko's gfn ring");
  }
}

KmodPageSource::~KmodPageSource() {
  if (ring_) ::munmap(ring_, ringBytes_);
  if (device_ >= 0) ::close(device_);
}

void KmodPageSource::detach() {
  if (::ioctl(device_, VMSYNC_IOC_DETACH) < 0) throwLastErrno("VMSYNC_IOC_DETACH");
}

void KmodPageSource::rearmWhilePaused() {
  // The module re-arms KVM's log and reports only the VMM's writes; a slot
  // change is no rescan then. A full ring, a slot the VMM logs itself or
  // RAM no longer followed still are.
  carried_ = harvest(VMSYNC_HARVEST_PAUSED);
}

DirtyUnits KmodPageSource::harvest() { return harvest(0); }

DirtyUnits KmodPageSource::harvest(std::uint32_t ask) {
  vmsync_harvest request{};
  request.request = ask;
  if (::ioctl(device_, VMSYNC_IOC_HARVEST, &request) < 0) {
    if (errno == ESRCH) fail("VMM process {} is gone: vmsync.ko detached from its VM", vmmPid_);
    throwLastErrno(fmt::format("vmsync.ko cannot harvest process {}'s VM", vmmPid_));
  }
  // What rearmWhilePaused() found belongs to this harvest.
  DirtyUnits out = std::move(carried_);
  carried_ = DirtyUnits{};
  auto* header = static_cast<vmsync_ring_header*>(ring_);
  const auto* entries = reinterpret_cast<const std::uint64_t*>(static_cast<std::uint8_t*>(ring_) +
                                                               header->entries_offset);
  const std::uint64_t mask = header->entries - 1;
  const std::uint64_t producer =
      std::atomic_ref<__u64>(header->producer).load(std::memory_order_acquire);
  std::uint64_t consumer = header->consumer;

  if (producer - consumer > header->entries)
    fail("vmsync.ko's ring is inconsistent: producer {} and consumer {} with {} entries", producer,
         consumer, header->entries);
  out.units.reserve(out.units.size() + (producer - consumer));
  lastVmmWritten_ = request.vmm_written;
  lastVmmBusy_ = request.vmm_busy;
  vmmWritten_ += request.vmm_written;
  for (; consumer != producer; ++consumer) {
    const std::uint64_t gfn = entries[consumer & mask] & VMSYNC_GFN_MASK;
    for (const auto& range : ranges_)
      if (gfn >= range.firstGfn && gfn - range.firstGfn < range.pages) {
        out.units.push_back(range.firstUnit + (gfn - range.firstGfn));
        break;
      }
  }
  std::atomic_ref<__u64>(header->consumer).store(consumer, std::memory_order_release);
  if (header->flags & VMSYNC_RING_OVERFLOW) {
    // A rescan carried from rearmWhilePaused() keeps its own reason.
    if (!out.everything) {
      out.everything = true;
      if (request.flags & VMSYNC_HARVEST_RING_FULL)
        out.rescanReason = fmt::format("vmsync.ko's ring of {} entries was full", header->entries);
      else if (request.flags & VMSYNC_HARVEST_VMM_LOGS)
        out.rescanReason = "the VMM logs a memory slot itself (a migration?)";
      else if (request.flags & VMSYNC_HARVEST_VMM_UNTRACKED)
        out.rescanReason = "guest RAM is no longer a shared file mapping: the VMM's own writes are not followed";
      else
        out.rescanReason = "the VMM changed its memory slots";
    }
    if (::ioctl(device_, VMSYNC_IOC_CLEAR_OVERFLOW) < 0)
      throwLastErrno("VMSYNC_IOC_CLEAR_OVERFLOW");
  }
  return out;
}

std::string KmodPageSource::counters() const {
  return fmt::format("{} pages written by the VMM itself (beyond KVM's log) since the attach", vmmWritten_);
}

}  // namespace vmsync
