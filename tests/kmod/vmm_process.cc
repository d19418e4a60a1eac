#include "vmm_process.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "base/error.h"

namespace vmsync::kmodtest {
namespace {

using testing::MiniVmm;

std::uint64_t readReply(int fd) {
  std::uint64_t value = 0;
  if (::read(fd, &value, sizeof value) != static_cast<ssize_t>(sizeof value))
    fail("the VMM process stopped answering");
  return value;
}

// The VMM's own view: KVM_GET_DIRTY_LOG on its slot 0 (ENOENT when logging is off).
std::uint64_t dirtyLogErrno(const MiniVmm& vmm) {
  static std::vector<std::uint64_t> bitmap(MiniVmm::kMemoryBytes / 4096 / 64);
  kvm_dirty_log log{};
  log.slot = 0;
  log.dirty_bitmap = bitmap.data();
  return ::ioctl(vmm.vmFd(), KVM_GET_DIRTY_LOG, &log) < 0 ? static_cast<std::uint64_t>(errno) : 0;
}

// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 without INITIALLY_SET; replies errno.
std::uint64_t enableManualProtect(const MiniVmm& vmm) {
  kvm_enable_cap cap{};
  cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
  cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
  return ::ioctl(vmm.vmFd(), KVM_ENABLE_CAP, &cap) < 0 ? static_cast<std::uint64_t>(errno) : 0;
}

// The module's read-only scratch in this process, from /proc/self/maps.
struct ScratchMapping {
  std::uintptr_t start = 0, end = 0;
  std::string perms;
};

ScratchMapping findScratch() {
  std::FILE* maps = std::fopen("/proc/self/maps", "r");
  ScratchMapping found;
  char line[512];
  while (maps && std::fgets(line, sizeof line, maps)) {
    if (!std::strstr(line, "[vmsync-scratch]")) continue;
    char perms[8] = {};
    unsigned long start = 0, end = 0;
    if (std::sscanf(line, "%lx-%lx %7s", &start, &end, perms) == 3) found = {start, end, perms};
    break;
  }
  if (maps) std::fclose(maps);
  return found;
}

// The VMM trying to change the arguments KVM reads for the module: through
// mprotect and through /proc/self/mem (which writes read-only private
// mappings that may be written). 0 when both are refused.
std::uint64_t probeScratch() {
  const ScratchMapping scratch = findScratch();
  if (!scratch.start) return 1;  // no [vmsync-scratch] in /proc/self/maps
  if (scratch.perms.find('w') != std::string::npos) return 2;
  if (::mprotect(reinterpret_cast<void*>(scratch.start), 4096, PROT_READ | PROT_WRITE) == 0) return 3;
  const int mem = ::open("/proc/self/mem", O_RDWR);
  const char byte = 1;
  const bool written = mem >= 0 && ::pwrite(mem, &byte, 1, static_cast<off_t>(scratch.start)) == 1;
  if (mem >= 0) ::close(mem);
  return written ? 4 : 0;
}

ScratchMapping replaced;

std::uint64_t replaceScratch() {
  replaced = findScratch();
  if (!replaced.start) return ENOENT;
  void* at = ::mmap(reinterpret_cast<void*>(replaced.start), replaced.end - replaced.start, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  if (at == MAP_FAILED) return static_cast<std::uint64_t>(errno);
  std::memset(at, 0x5a, replaced.end - replaced.start);
  return 0;
}

std::uint64_t checkReplaced() {
  if (!replaced.start) return 1;
  const auto* bytes = reinterpret_cast<const volatile std::uint8_t*>(replaced.start);
  // Reading an unmapped page would kill this process: look first.
  std::FILE* maps = std::fopen("/proc/self/maps", "r");
  char line[512];
  bool mapped = false;
  while (maps && std::fgets(line, sizeof line, maps)) {
    unsigned long start = 0, end = 0;
    if (std::sscanf(line, "%lx-%lx", &start, &end) == 2 && start <= replaced.start && end >= replaced.end)
      mapped = true;
  }
  if (maps) std::fclose(maps);
  if (!mapped) return 2;
  for (std::uintptr_t i = 0; i < replaced.end - replaced.start; ++i)
    if (bytes[i] != 0x5a) return 3;
  return 0;
}

// The VMM process: obeys commands until its command pipe closes.
int runVmm(const MiniVmm::Options& options, int commands, int replies) {
  try {
    MiniVmm vmm(options);
    // Ready: the number of its guest memory fd, for the controller to map.
    std::uint64_t ready = static_cast<std::uint64_t>(vmm.memoryFd());
    writeAll(replies, &ready, sizeof ready);
    bool freely = false;
    while (true) {
      pollfd p{.fd = commands, .events = POLLIN, .revents = 0};
      if (freely && ::poll(&p, 1, 0) == 0) {
        vmm.runRound();
        continue;
      }
      char command;
      if (::read(commands, &command, 1) != 1) return 0;
      std::uint64_t reply = 0;
      if (command == kRunRound)
        reply = vmm.runRound();
      else if (command == kRunFreely)
        freely = true;
      else if (command == kQueryDirtyLog)
        reply = dirtyLogErrno(vmm);
      else if (command == kManualProtect)
        reply = enableManualProtect(vmm);
      else if (command == kLoggingOff)
        vmm.setSlotFlags(0);
      else if (command == kProbeScratch)
        reply = probeScratch();
      else if (command == kReplaceScratch)
        reply = replaceScratch();
      else if (command == kCheckReplaced)
        reply = checkReplaced();
      else if (command == kWriteAsVmm)
        vmm.writeAsVmm(kVmmWrittenPage, 0x5a);
      if (command != kRunFreely) writeAll(replies, &reply, sizeof reply);
    }
  } catch (const std::exception& e) {
    std::printf("FAIL: VMM: %s\n", e.what());
    return 1;
  }
}

}  // namespace

void writeAll(int fd, const void* data, std::size_t size) {
  if (::write(fd, data, size) != static_cast<ssize_t>(size)) vmsync::throwLastErrno("pipe write");
}

std::uint64_t Vmm::ask(char command) {
  writeAll(commands, &command, 1);
  return readReply(replies);
}

Vmm startVmm(const MiniVmm::Options& options) {
  int toChild[2], fromChild[2];
  if (::pipe(toChild) < 0 || ::pipe(fromChild) < 0) vmsync::throwLastErrno("pipe");
  std::fflush(stdout);
  pid_t pid = ::fork();
  if (pid < 0) vmsync::throwLastErrno("fork");
  if (pid == 0) {
    ::close(toChild[1]);
    ::close(fromChild[0]);
    std::_Exit(runVmm(options, toChild[0], fromChild[1]));
  }
  ::close(toChild[0]);
  ::close(fromChild[1]);
  Vmm vmm{pid, toChild[1], fromChild[0]};
  const int remoteMemoryFd = static_cast<int>(readReply(vmm.replies));
  if (remoteMemoryFd < 0) return vmm;  // anonymous memory: nothing to map
  // The controller maps guest memory as it maps QEMU's shared RAM file.
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  const int memoryFd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, remoteMemoryFd, 0));
  if (pidfd < 0 || memoryFd < 0) vmsync::throwLastErrno("pidfd_getfd of the guest memory");
  void* memory = ::mmap(nullptr, MiniVmm::kMemoryBytes, PROT_READ, MAP_SHARED, memoryFd, 0);
  if (memory == MAP_FAILED) vmsync::throwLastErrno("cannot map guest memory");
  ::close(memoryFd);
  ::close(pidfd);
  vmm.memory = static_cast<const std::uint8_t*>(memory);
  return vmm;
}

void stopVmm(Vmm& vmm) {
  ::close(vmm.commands);
  ::close(vmm.replies);
  ::waitpid(vmm.pid, nullptr, 0);
}

}  // namespace vmsync::kmodtest
