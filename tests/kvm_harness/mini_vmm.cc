#include "mini_vmm.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "base/error.h"

// The guest: rdi = first data page's address, rsi = number of data pages.
// Round r (r8) writes the byte r into page i when i % 3 != 0 and
// (i * 7 + r) % 5 == 0, then reports with OUT to port 0x10 and goes on.
asm(R"(
  .pushsection .rodata
  .globl vmsync_guest_code_start
  .globl vmsync_guest_code_end
vmsync_guest_code_start:
  xor %r8, %r8
1:
  xor %rcx, %rcx
2:
  mov %rcx, %rax
  xor %rdx, %rdx
  mov $3, %rbx
  div %rbx
  test %rdx, %rdx
  jz 3f
  mov %rcx, %rax
  imul $7, %rax, %rax
  add %r8, %rax
  xor %rdx, %rdx
  mov $5, %rbx
  div %rbx
  test %rdx, %rdx
  jnz 3f
  mov %rcx, %rax
  shl $12, %rax
  add %rdi, %rax
  mov %r8b, (%rax)
3:
  inc %rcx
  cmp %rsi, %rcx
  jb 2b
  mov %r8, %rax
  out %al, $0x10
  inc %r8
  jmp 1b
vmsync_guest_code_end:
  .popsection
)");

// The stride guest: rdi = first address, rsi = end address, rdx = stride.
// Round r (r8) writes the byte r at rdi, rdi + rdx, ... below rsi, then
// reports with OUT to port 0x10 and goes on.
asm(R"(
  .pushsection .rodata
  .globl vmsync_stride_guest_start
  .globl vmsync_stride_guest_end
vmsync_stride_guest_start:
  xor %r8, %r8
1:
  mov %rdi, %rcx
2:
  mov %r8b, (%rcx)
  add %rdx, %rcx
  cmp %rsi, %rcx
  jb 2b
  mov %r8, %rax
  out %al, $0x10
  inc %r8
  jmp 1b
vmsync_stride_guest_end:
  .popsection
)");

extern "C" const std::uint8_t vmsync_guest_code_start[];
extern "C" const std::uint8_t vmsync_guest_code_end[];
extern "C" const std::uint8_t vmsync_stride_guest_start[];
extern "C" const std::uint8_t vmsync_stride_guest_end[];

namespace vmsync::testing {

namespace {

constexpr std::uint64_t kPml4 = 0x1000, kPdpt = 0x2000, kPd = 0x3000, kCode = 0x8000;
constexpr std::uint16_t kReportPort = 0x10;

int ioctlOrThrow(int fd, unsigned long request, unsigned long arg, const char* what) {
  int r = ::ioctl(fd, request, arg);
  if (r < 0) throwLastErrno(what);
  return r;
}

}  // namespace

std::string MiniVmm::unavailableReason() {
  int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) return fmt::format("/dev/kvm: {}", std::strerror(errno));
  std::string reason;
  if (::ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) reason = "unexpected KVM API version";
  else if (::ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING) <= 0 &&
           ::ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) <= 0)
    reason = "this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)";
  ::close(kvm);
  return reason;
}

MiniVmm::MiniVmm(std::uint32_t ringEntries) : MiniVmm(Options{.ringEntries = ringEntries}) {}

MiniVmm::MiniVmm(const Options& options)
    : memoryBytes_(options.memoryBytes), strideBytes_(options.strideBytes) {
  const std::uint32_t ringEntries = options.ringEntries;
  if (memoryBytes_ % (2u << 20) != 0 || memoryBytes_ == 0 || memoryBytes_ > (1u << 30))
    fail("guest memory of {} bytes: must be a multiple of 2 MiB up to 1 GiB", memoryBytes_);
  if (strideBytes_ % 4096 != 0) fail("stride of {} bytes is not page-aligned", strideBytes_);
  kvm_ = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm_ < 0) throwLastErrno("cannot open /dev/kvm");
  vm_ = ioctlOrThrow(kvm_, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
  if (ringEntries > 0) {
    int cap = ::ioctl(vm_, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING) > 0 ? KVM_CAP_DIRTY_LOG_RING
                                                                          : KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
    kvm_enable_cap enable{};
    enable.cap = static_cast<__u32>(cap);
    enable.args[0] = kvmDirtyRingBytes(ringEntries);
    ioctlOrThrow(vm_, KVM_ENABLE_CAP, reinterpret_cast<unsigned long>(&enable), "KVM_ENABLE_CAP(dirty ring)");
  }
  void* mem = MAP_FAILED;
  if (!options.memoryPath.empty()) {
    memoryFd_ = ::open(options.memoryPath.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (memoryFd_ < 0 || ::ftruncate(memoryFd_, static_cast<off_t>(memoryBytes_)) < 0)
      throwLastErrno("cannot create the guest memory file " + options.memoryPath);
    mem = ::mmap(nullptr, memoryBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, memoryFd_, 0);
  } else if (options.sharedMemory) {
    memoryFd_ = ::memfd_create("mini-vmm-ram", MFD_CLOEXEC);
    if (memoryFd_ < 0 || ::ftruncate(memoryFd_, static_cast<off_t>(memoryBytes_)) < 0)
      throwLastErrno("cannot create the guest memory file");
    mem = ::mmap(nullptr, memoryBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, memoryFd_, 0);
  } else {
    mem = ::mmap(nullptr, memoryBytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  }
  if (mem == MAP_FAILED) throwLastErrno("cannot map guest memory");
  memory_ = static_cast<std::uint8_t*>(mem);
  setSlotFlags(ringEntries > 0 ? KVM_MEM_LOG_DIRTY_PAGES : 0);
  vcpu_ = ioctlOrThrow(vm_, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
  runSize_ = static_cast<std::size_t>(ioctlOrThrow(kvm_, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"));
  run_ = ::mmap(nullptr, runSize_, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_, 0);
  if (run_ == MAP_FAILED) throwLastErrno("cannot map the vCPU's kvm_run");
  if (ringEntries > 0) {
    const long page = ::sysconf(_SC_PAGESIZE);
    void* ring = ::mmap(nullptr, kvmDirtyRingBytes(ringEntries), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_,
                        KVM_DIRTY_LOG_PAGE_OFFSET * page);
    if (ring == MAP_FAILED) throwLastErrno("cannot map the vCPU's dirty ring");
    ring_.entries = static_cast<kvm_dirty_gfn*>(ring);
    ring_.size = ringEntries;
    source_ = std::make_unique<KvmRingPageSource>(vm_, std::vector<KvmDirtyRing*>{&ring_},
                                                  std::map<std::uint32_t, std::uint64_t>{{0, 0}});
  }
  setUpLongMode();
}

MiniVmm::~MiniVmm() {
  source_.reset();
  if (ring_.entries) ::munmap(ring_.entries, kvmDirtyRingBytes(ring_.size));
  if (run_ && run_ != MAP_FAILED) ::munmap(run_, runSize_);
  if (vcpu_ >= 0) ::close(vcpu_);
  if (vm_ >= 0) ::close(vm_);
  if (kvm_ >= 0) ::close(kvm_);
  if (memory_) ::munmap(memory_, memoryBytes_);
  if (memoryFd_ >= 0) ::close(memoryFd_);
}

void MiniVmm::setSlotFlags(std::uint32_t flags) {
  kvm_userspace_memory_region region{};
  region.slot = 0;
  region.flags = flags;
  region.guest_phys_addr = 0;
  region.memory_size = memoryBytes_;
  region.userspace_addr = reinterpret_cast<__u64>(memory_);
  ioctlOrThrow(vm_, KVM_SET_USER_MEMORY_REGION, reinterpret_cast<unsigned long>(&region),
               "KVM_SET_USER_MEMORY_REGION");
}

void MiniVmm::setUpLongMode() {
  // Identity map of guest memory with 2 MiB pages.
  auto entry = [&](std::uint64_t at, std::uint64_t value) { std::memcpy(memory_ + at, &value, sizeof value); };
  entry(kPml4, kPdpt | 0x3);
  entry(kPdpt, kPd | 0x3);
  for (std::uint64_t i = 0; i < memoryBytes_ / (2u << 20); ++i) entry(kPd + 8 * i, (i * (2u << 20)) | 0x83);
  const std::uint8_t* codeStart = strideBytes_ ? vmsync_stride_guest_start : vmsync_guest_code_start;
  const std::uint8_t* codeEnd = strideBytes_ ? vmsync_stride_guest_end : vmsync_guest_code_end;
  std::memcpy(memory_ + kCode, codeStart, static_cast<std::size_t>(codeEnd - codeStart));

  kvm_sregs sregs{};
  ioctlOrThrow(vcpu_, KVM_GET_SREGS, reinterpret_cast<unsigned long>(&sregs), "KVM_GET_SREGS");
  kvm_segment code{};
  code.base = 0;
  code.limit = 0xffffffff;
  code.selector = 0x8;
  code.type = 11;  // execute/read, accessed
  code.present = 1;
  code.s = 1;
  code.l = 1;
  code.g = 1;
  kvm_segment data = code;
  data.selector = 0x10;
  data.type = 3;  // read/write, accessed
  data.l = 0;
  data.db = 1;
  sregs.cs = code;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.cr3 = kPml4;
  sregs.cr4 = 1u << 5;                                       // PAE
  sregs.cr0 = 0x80050033;                                    // PG, WP, NE, ET, MP, PE
  sregs.efer = (1u << 8) | (1u << 10);                       // LME, LMA
  ioctlOrThrow(vcpu_, KVM_SET_SREGS, reinterpret_cast<unsigned long>(&sregs), "KVM_SET_SREGS");
  kvm_regs regs{};
  regs.rip = kCode;
  regs.rflags = 0x2;
  regs.rdi = kDataStart;
  regs.rsi = strideBytes_ ? memoryBytes_ : kDataPages;
  regs.rdx = strideBytes_;
  ioctlOrThrow(vcpu_, KVM_SET_REGS, reinterpret_cast<unsigned long>(&regs), "KVM_SET_REGS");
}

std::uint64_t MiniVmm::runRound() {
  auto* run = static_cast<kvm_run*>(run_);
  while (true) {
    if (::ioctl(vcpu_, KVM_RUN, 0) < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      throwLastErrno("KVM_RUN");
    }
    switch (run->exit_reason) {
      case KVM_EXIT_IO:
        if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == kReportPort) {
          kvm_regs regs{};
          ioctlOrThrow(vcpu_, KVM_GET_REGS, reinterpret_cast<unsigned long>(&regs), "KVM_GET_REGS");
          return regs.r8;  // the round that just ended
        }
        fail("guest did I/O on unexpected port {:#x}", run->io.port);
      case KVM_EXIT_DIRTY_RING_FULL:
        fail("the dirty ring filled within one round; use a larger ring");
      case KVM_EXIT_FAIL_ENTRY:
        fail("KVM could not enter the guest (hardware reason {:#x})",
             run->fail_entry.hardware_entry_failure_reason);
      case KVM_EXIT_INTERNAL_ERROR:
        fail("KVM internal error {}", run->internal.suberror);
      default:
        fail("unexpected KVM exit {}", run->exit_reason);
    }
  }
}

std::set<std::uint64_t> MiniVmm::pagesWrittenIn(std::uint64_t round) {
  std::set<std::uint64_t> pages;
  for (std::uint64_t i = 0; i < kDataPages; ++i)
    if (i % 3 != 0 && (i * 7 + round) % 5 == 0) pages.insert(kDataStart / 4096 + i);
  return pages;
}

bool MiniVmm::neverWritten(std::uint64_t unit) {
  return unit >= kDataStart / 4096 && unit < kDataStart / 4096 + kDataPages && (unit - kDataStart / 4096) % 3 == 0;
}

}  // namespace vmsync::testing
