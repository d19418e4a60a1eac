// The minimal KVM VMM (tests/kvm_harness) as a process of its own, for
// kmod_invariant: a child obeys one-byte commands from the controller, its
// parent, and answers each with a 64-bit reply. The controller maps guest
// memory read-only, as vmsync maps QEMU's shared RAM file.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>

#include "mini_vmm.h"

namespace vmsync::kmodtest {

// Commands from the controller to the VMM process, one byte each.
constexpr char kRunRound = 'r';       // run one round, reply with its number
constexpr char kRunFreely = 'f';      // from now on run rounds without waiting
constexpr char kQueryDirtyLog = 'l';  // reply with the errno of the VMM's own KVM_GET_DIRTY_LOG
constexpr char kManualProtect = 'm';  // enable KVM's manual dirty-log protection (as QEMU does)
constexpr char kLoggingOff = 'o';     // rewrite the slot without KVM_MEM_LOG_DIRTY_PAGES
constexpr char kProbeScratch = 's';   // try to write the module's scratch; reply what went wrong, 0 if refused
constexpr char kReplaceScratch = 'x'; // map its own memory over the scratch; reply errno
constexpr char kCheckReplaced = 'y';  // reply 0 if that memory is still there, intact
constexpr char kWriteAsVmm = 'w';     // write kVmmWrittenPage through the VMM's mapping

// The page kWriteAsVmm writes: a data page the guest never writes.
constexpr std::uint64_t kVmmWrittenPage = testing::MiniVmm::kDataStart / 4096 + 3;

// Writes all of `data` to a pipe; throws Error if it cannot.
void writeAll(int fd, const void* data, std::size_t size);

// The controller's handle on a VMM process.
struct Vmm {
  pid_t pid = -1;
  int commands = -1, replies = -1;
  const std::uint8_t* memory = nullptr;  // guest memory, mapped read-only; null for anonymous memory
  // Sends `command` and returns the reply; throws Error when the VMM stopped answering.
  std::uint64_t ask(char command);
};

// Forks a VMM process whose guest memory is kept as `options` say, and maps
// that memory when it is a file.
Vmm startVmm(const testing::MiniVmm::Options& options = testing::MiniVmm::Options{.sharedMemory = true});
// Ends a VMM process: its command pipe closes and it exits.
void stopVmm(Vmm& vmm);

}  // namespace vmsync::kmodtest
