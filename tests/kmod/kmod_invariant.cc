// The kmod page source's invariant test, run inside Debian's kernel under
// QEMU TCG with nested KVM (run_kmod_test.sh builds it static for the
// initramfs). A child process is the VMM: the minimal KVM VMM, with no dirty
// logging of its own. The parent is the controller, a separate process: it
// attaches to the child's VM through /dev/vmsync (pidfd_getfd of the child's
// anon_inode:kvm-vm fd) and, as KVM's dirty_log_test does, checks every round
// that every page the guest wrote is reported, and that pages the guest
// never writes are not; the VMM turning logging off must give one rescan and
// then exact rounds again. Then it detaches while the guest runs (the slot's
// logging must be off again), attaches again, and kills the VMM with SIGKILL
// while attached, harvesting back to back from another thread. Last, the
// rounds again with KVM's manual protection on, as QEMU runs; a ring too
// small; and a controller killed while attached. Then guest RAM kept other
// ways: anonymous memory and hugetlbfs refused at attach with the reason,
// tmpfs with transparent huge pages followed. Prints FAIL: <why> and exits
// 1 on the first violation.
#include <fcntl.h>
#include <linux/kvm.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <thread>
#include <vector>

#include "base/error.h"
#include "kmod/uapi/vmsync.h"
#include "harvest/kmod_page_source.h"
#include "mini_vmm.h"

namespace {

using vmsync::testing::MiniVmm;

// Commands from the controller to the VMM process, one byte each.
constexpr char kRunRound = 'r';       // run one round, reply with its number
constexpr char kRunFreely = 'f';      // from now on run rounds without waiting
constexpr char kQueryDirtyLog = 'l';  // reply with the errno of the VMM's own KVM_GET_DIRTY_LOG
constexpr char kManualProtect = 'm';  // enable KVM's manual dirty-log protection (as QEMU does)
constexpr char kLoggingOff = 'o';     // rewrite the slot without KVM_MEM_LOG_DIRTY_PAGES
constexpr char kProbeScratch = 's';   // try to write the module's scratch; reply what went wrong, 0 if refused
constexpr char kReplaceScratch = 'x'; // map its own memory over the scratch; reply errno
constexpr char kCheckReplaced = 'y';  // reply 0 if that memory is still there, intact
constexpr char kWriteAsVmm = 'w';     // write a never-written data page through the VMM's mapping

// Lockstep rounds checked page by page.
constexpr int kRounds = 30;
// Harvests while the guest runs on its own.
constexpr int kRunningHarvests = 40;
// Outside the data pages only the guest's page tables (accessed/dirty bits)
// may be written: at most this many units per round.
constexpr std::size_t kOtherPagesBound = 4;

[[noreturn]] void failTest(const std::string& why) {
  std::printf("FAIL: %s\n", why.c_str());
  std::fflush(stdout);
  std::exit(1);
}

void writeAll(int fd, const void* data, std::size_t size) {
  if (::write(fd, data, size) != static_cast<ssize_t>(size)) vmsync::throwLastErrno("pipe write");
}

std::uint64_t readReply(int fd) {
  std::uint64_t value = 0;
  if (::read(fd, &value, sizeof value) != static_cast<ssize_t>(sizeof value))
    failTest("the VMM process stopped answering");
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

// The page kWriteAsVmm writes: a data page the guest never writes.
constexpr std::uint64_t kVmmWrittenPage = MiniVmm::kDataStart / 4096 + 3;

// How the next VMM process keeps guest memory (set before startVmm forks).
MiniVmm::Options vmmOptions{.sharedMemory = true};

// The VMM process: obeys commands until its command pipe closes.
int runVmm(int commands, int replies) {
  try {
    MiniVmm vmm(vmmOptions);
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

struct Vmm {
  pid_t pid = -1;
  int commands = -1, replies = -1;
  const std::uint8_t* memory = nullptr;  // guest memory, mapped read-only
  std::uint64_t ask(char command) {
    writeAll(commands, &command, 1);
    return readReply(replies);
  }
};

Vmm startVmm(const MiniVmm::Options& options = MiniVmm::Options{.sharedMemory = true}) {
  vmmOptions = options;
  int toChild[2], fromChild[2];
  if (::pipe(toChild) < 0 || ::pipe(fromChild) < 0) vmsync::throwLastErrno("pipe");
  std::fflush(stdout);
  pid_t pid = ::fork();
  if (pid < 0) vmsync::throwLastErrno("fork");
  if (pid == 0) {
    ::close(toChild[1]);
    ::close(fromChild[0]);
    std::_Exit(runVmm(toChild[0], fromChild[1]));
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

bool isDataPage(std::uint64_t unit) {
  const std::uint64_t first = MiniVmm::kDataStart / 4096;
  return unit >= first && unit < first + MiniVmm::kDataPages;
}

// The whole guest memory is one slot from GPA 0: gfn == unit.
std::vector<vmsync::GfnRange> guestRanges() {
  return {{.firstGfn = 0, .pages = MiniVmm::kMemoryBytes / 4096, .firstUnit = 0}};
}

// Runs `rounds` rounds one at a time, harvesting after each; `label` names the run.
// `alsoKept`: pages a harvest before the last one kept reported, which the
// last one carried over (a re-arm while paused) and the first round sees.
void checkLockstepRounds(Vmm& vmm, vmsync::KmodPageSource& source, int rounds, const char* label,
                         std::uint64_t alsoKept = 0) {
  std::size_t reportedTotal = 0, busyTotal = 0, keptTotal = 0;
  std::set<std::uint64_t> writtenBefore;
  std::uint64_t expected = ~0ull;
  // Pages the last harvest found with an I/O in flight (a reference beyond
  // their mappings, such as the kernel's own short-lived ones): the module
  // reports each of them again in this harvest, and nothing else may come.
  std::uint64_t busyBefore = source.lastVmmBusy() + alsoKept;
  for (int i = 0; i < rounds; ++i) {
    const std::uint64_t round = vmm.ask(kRunRound);
    if (expected != ~0ull && round != expected)
      failTest(fmt::format("round {} reported as {}", expected, round));
    expected = round + 1;
    vmsync::DirtyUnits reported = source.harvest();
    if (reported.everything)
      failTest(fmt::format("round {}: rescan asked: {}", round, reported.rescanReason));
    const std::set<std::uint64_t> set(reported.units.begin(), reported.units.end());
    const auto written = MiniVmm::pagesWrittenIn(round);
    for (auto page : written)
      if (vmm.memory[page * 4096] != static_cast<std::uint8_t>(round))
        failTest(fmt::format("round {}: page {} does not hold the round's byte", round, page));
    for (auto page : written)
      if (!set.count(page))
        failTest(fmt::format("round {}: page {} was written but not reported", round, page));
    std::size_t others = 0, kept = 0;
    for (auto unit : set) {
      if (MiniVmm::neverWritten(unit))
        failTest(fmt::format("round {}: page {} is never written but was reported", round, unit));
      if (!isDataPage(unit))
        ++others;
      else if (!written.count(unit) && !writtenBefore.count(unit) && ++kept > busyBefore)
        failTest(fmt::format(
            "round {}: page {} reported, written in neither this round nor the one before, and "
            "the harvest before kept only {} page(s) reported for an I/O in flight",
            round, unit, busyBefore));
    }
    busyBefore = source.lastVmmBusy();
    busyTotal += busyBefore;
    keptTotal += kept;
    if (others > kOtherPagesBound)
      failTest(fmt::format("round {}: {} pages outside the data pages reported (bound {})", round,
                           others, kOtherPagesBound));
    reportedTotal += set.size();
    writtenBefore = written;
  }
  std::printf(
      "kmod invariant (%s): %d lockstep rounds, %zu pages reported, every written page each "
      "round; %zu reported again for a reference held beyond their mappings (%zu found so)\n",
      label, rounds, reportedTotal, keptTotal, busyTotal);
}

// With the guest running, as KVM's dirty_log_test: a data page whose byte
// changed between the reads after harvests h-1 and h was written after
// harvest h-1 re-armed it, so harvest h or h+1 must report it.
void checkWhileRunning(Vmm& vmm, vmsync::KmodPageSource& source, std::size_t* reported,
                       std::size_t* changed) {
  const std::uint64_t first = MiniVmm::kDataStart / 4096;
  std::vector<std::uint8_t> seen(MiniVmm::kDataPages);
  for (std::uint64_t i = 0; i < MiniVmm::kDataPages; ++i) seen[i] = vmm.memory[(first + i) * 4096];
  std::set<std::uint64_t> owed;  // changed pages harvest h did not report: h+1 must
  for (int h = 0; h < kRunningHarvests; ++h) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    vmsync::DirtyUnits units = source.harvest();
    if (units.everything) failTest("running: rescan asked: " + units.rescanReason);
    const std::set<std::uint64_t> set(units.units.begin(), units.units.end());
    for (auto unit : set)
      if (MiniVmm::neverWritten(unit))
        failTest(fmt::format("running: never-written page {} reported", unit));
    for (auto unit : owed)
      if (!set.count(unit))
        failTest(fmt::format(
            "running: page {} changed before harvest {} and was in neither it nor the next", unit,
            h - 1));
    owed.clear();
    for (std::uint64_t i = 0; i < MiniVmm::kDataPages; ++i) {
      const std::uint8_t now = vmm.memory[(first + i) * 4096];
      if (now == seen[i]) continue;
      seen[i] = now;
      ++*changed;
      if (!set.count(first + i)) owed.insert(first + i);
    }
    *reported += set.size();
  }
  if (*changed == 0) failTest("running: the guest changed no page");
}

// The VMM turns logging off on its slot: the next harvest must ask for a
// rescan, and the one after must be exact again (the module turned it back on).
void checkSlotChangeIsFollowed(Vmm& vmm, vmsync::KmodPageSource& source) {
  vmm.ask(kLoggingOff);
  vmm.ask(kRunRound);
  vmsync::DirtyUnits units = source.harvest();
  if (!units.everything)
    failTest("the VMM turned logging off and the harvest did not ask for a rescan");
  std::printf("slot change: rescan asked (%s)\n", units.rescanReason.c_str());
  checkLockstepRounds(vmm, source, 5, "after the slot change");
  std::printf("SLOT_CHANGE_OK\n");
}

// The same slot change while the guest does not run (between two lockstep
// rounds, as QEMU's device-state save turns logging off while the VM is
// paused), followed by a re-arm: no rescan, and the rounds after it exact.
void checkRearmWhilePaused(Vmm& vmm, vmsync::KmodPageSource& source) {
  // The harvest before kept pages for a reference beyond their mappings;
  // the re-arm reports them again and carries them into the first round.
  const std::uint64_t keptBefore = source.lastVmmBusy();
  vmm.ask(kLoggingOff);
  source.rearmWhilePaused();
  // A rescan, or a page not written since beyond those kept, fails: KVM's
  // re-armed log leaked into what the re-arm carried.
  checkLockstepRounds(vmm, source, 4, "after a re-arm while paused", keptBefore);
  std::printf("REARM_PAUSED_OK\n");
}

// Ends a VMM process: its command pipe closes and it exits.
void stopVmm(Vmm& vmm) {
  ::close(vmm.commands);
  ::close(vmm.replies);
  ::waitpid(vmm.pid, nullptr, 0);
}

// The attach to `vmm` must be refused with a reason holding `expected`.
void expectRefused(Vmm& vmm, const char* expected, const char* label) {
  try {
    vmsync::KmodPageSource source(vmm.pid, guestRanges(), 4096);
  } catch (const vmsync::Error& e) {
    const std::string why = e.what();
    if (why.find(expected) == std::string::npos)
      failTest(fmt::format("{}: refused, but not for \"{}\": {}", label, expected, why));
    std::printf("%s: %s\n", label, why.c_str());
    return;
  }
  failTest(fmt::format("{}: the attach was not refused", label));
}

// Kilobytes of the VMM's mapping of `path` that its page tables map with
// huge (PMD) entries, from /proc/PID/smaps.
std::uint64_t pmdMappedKb(pid_t pid, const std::string& path) {
  std::ifstream smaps(fmt::format("/proc/{}/smaps", pid));
  std::string line;
  bool inMapping = false;
  std::uint64_t kb = 0;
  while (std::getline(smaps, line)) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && line.find('-') < line.find(' ')) {
      inMapping = line.size() >= path.size() && line.compare(line.size() - path.size(), path.size(), path) == 0;
      continue;
    }
    if (!inMapping) continue;
    for (const char* field : {"ShmemPmdMapped:", "FilePmdMapped:"})
      if (line.rfind(field, 0) == 0) kb += std::stoull(line.substr(std::strlen(field)));
  }
  return kb;
}

// Guest RAM whose VMM-side writes the module cannot follow is refused at
// attach with the reason: anonymous memory (QEMU without a shared
// memory-backend-file) and hugetlbfs. RAM on tmpfs with transparent huge
// pages is followed: the huge pages stay whole in the VMM's page tables,
// every page the guest writes is reported each round, and so is a page the
// VMM writes itself. The test script mounts /hugetlbfs and /thp (huge=always).
void checkBackings() {
  {
    Vmm vmm = startVmm(MiniVmm::Options{.sharedMemory = false});
    expectRefused(vmm, "is not a shared file mapping", "ANONYMOUS_REFUSED_OK");
    stopVmm(vmm);
  }
  {
    Vmm vmm = startVmm(MiniVmm::Options{.memoryPath = "/hugetlbfs/ram"});
    expectRefused(vmm, "is on hugetlbfs", "HUGETLB_REFUSED_OK");
    stopVmm(vmm);
  }
  Vmm vmm = startVmm(MiniVmm::Options{.memoryPath = "/thp/ram"});
  {
    vmsync::KmodPageSource source(vmm.pid, guestRanges(), 4096);
    std::size_t reported = 0;
    constexpr int kThpRounds = 10;
    for (int i = 0; i < kThpRounds; ++i) {
      const std::uint64_t round = vmm.ask(kRunRound);
      vmsync::DirtyUnits units = source.harvest();
      if (units.everything) failTest("THP: rescan asked: " + units.rescanReason);
      const std::set<std::uint64_t> set(units.units.begin(), units.units.end());
      for (auto page : MiniVmm::pagesWrittenIn(round))
        if (!set.count(page)) failTest(fmt::format("THP: round {}: page {} was written but not reported", round, page));
      reported += set.size();
    }
    const std::uint64_t hugeKb = pmdMappedKb(vmm.pid, "/thp/ram");
    if (hugeKb == 0)
      failTest("THP: the VMM's mapping of /thp/ram has no huge page (tmpfs huge=always gave none)");
    vmm.ask(kWriteAsVmm);
    vmsync::DirtyUnits units = source.harvest();
    if (std::find(units.units.begin(), units.units.end(), kVmmWrittenPage) == units.units.end())
      failTest("THP: the page the VMM wrote through its huge mapping is not in the next harvest");
    std::printf(
        "THP_OK: guest RAM on tmpfs with huge pages (%llu KiB mapped huge by the VMM): %d rounds, every "
        "written page reported, %zu pages a harvest on average (a huge page the VMM's mapping dirtied "
        "is reported whole at each harvest); the VMM's own write reported in the next harvest\n",
        static_cast<unsigned long long>(hugeKb), kThpRounds, reported / kThpRounds);
  }
  stopVmm(vmm);
}

int run() {
  const std::string reason = vmsync::KmodPageSource::unavailableReason();
  if (!reason.empty()) failTest(reason);
  if (!MiniVmm::unavailableReason().empty()) failTest("KVM: " + MiniVmm::unavailableReason());

  // The module checks what it is handed.
  {
    int device = ::open(VMSYNC_DEVICE_PATH, O_RDWR);
    int notKvm = ::open("/dev/null", O_RDWR);
    vmsync_attach attach{};
    attach.vm_fd = notKvm;
    if (::ioctl(device, VMSYNC_IOC_ATTACH, &attach) == 0 || errno != EINVAL)
      failTest("attach with /dev/null was not refused with EINVAL");
    vmsync_harvest harvest{};
    if (::ioctl(device, VMSYNC_IOC_HARVEST, &harvest) == 0 || errno != ENOTCONN)
      failTest("harvest before attach was not refused with ENOTCONN");
    ::close(notKvm);
    ::close(device);
    std::printf("ATTACH_CHECKS_OK\n");
  }

  Vmm vmm = startVmm();
  {
    vmsync::KmodPageSource source(vmm.pid, guestRanges(), 4096);
    std::printf("attached to pid %d: %u slot(s) followed\n", vmm.pid, source.slots());
    if (source.slots() != 1) failTest("expected the VMM's one slot to be followed");
    checkLockstepRounds(vmm, source, kRounds, "KVM_GET_DIRTY_LOG");
    std::printf("KMOD_INVARIANT_OK\n");
    checkSlotChangeIsFollowed(vmm, source);
    checkRearmWhilePaused(vmm, source);

    // The guest now runs on its own; harvest it while it runs, then detach.
    const char freely = kRunFreely;
    writeAll(vmm.commands, &freely, 1);
    std::size_t reported = 0, changed = 0;
    checkWhileRunning(vmm, source, &reported, &changed);
    source.detach();
    const std::uint64_t err = vmm.ask(kQueryDirtyLog);
    if (err != ENOENT)
      failTest(fmt::format(
          "after detach the VMM's KVM_GET_DIRTY_LOG gave errno {}, not ENOENT (logging off)", err));
    bool refused = false;
    try {
      source.harvest();
    } catch (const vmsync::Error&) {
      refused = true;
    }
    if (!refused) failTest("harvest after detach did not fail");
    std::printf(
        "RUNNING_OK: %d harvests with the guest running, %zu pages reported, %zu seen changed, "
        "each in its harvest or the next\n",
        kRunningHarvests, reported, changed);
    std::printf("DETACH_RUNNING_OK: slot logging off after detach\n");
  }

  // The arguments KVM reads for the module are out of the VMM's reach, and
  // a detach unmaps only what is still the module's.
  {
    vmsync::KmodPageSource source(vmm.pid, guestRanges(), 4096);
    source.harvest();
    if (const auto why = vmm.ask(kProbeScratch))
      failTest(fmt::format("the VMM could get at the module's scratch (probe result {}: 1 not in its maps, 2 "
                           "mapped writable, 3 mprotect, 4 /proc/self/mem)",
                           why));
    if (const auto err = vmm.ask(kReplaceScratch))
      failTest(fmt::format("the VMM could not map over the scratch: errno {}", err));
    source.detach();
    if (const auto why = vmm.ask(kCheckReplaced))
      failTest(fmt::format("the detach unmapped or changed what the VMM had put where the scratch was "
                           "(check result {})",
                           why));
    std::printf("SCRATCH_OK: read-only to the VMM; a detach left alone the VMM's memory over it\n");
  }

  {
    vmsync::KmodPageSource source(vmm.pid, guestRanges(), 4096);
    if (vmm.ask(kQueryDirtyLog) != 0) failTest("after a second attach the slot does not log");
    // Harvest back to back from another thread while the VMM is killed: the
    // kill lands before, during or between harvests; once the VMM is
    // reaped, the next harvest must fail.
    std::atomic<int> harvests{0};
    std::string what;
    std::thread harvester([&] {
      try {
        while (true) {
          source.harvest();
          ++harvests;
        }
      } catch (const vmsync::Error& e) {
        what = e.what();
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ::kill(vmm.pid, SIGKILL);
    int status = 0;
    ::waitpid(vmm.pid, &status, 0);
    harvester.join();
    if (!WIFSIGNALED(status)) failTest("the VMM did not die of SIGKILL");
    if (harvests == 0) failTest("no harvest succeeded before the VMM was killed");
    std::printf("KILL9_OK after %d harvests: %s\n", harvests.load(), what.c_str());
  }

  // QEMU enables manual protection: KVM_GET_DIRTY_LOG then only copies the
  // log and the module re-arms with KVM_CLEAR_DIRTY_LOG.
  Vmm manual = startVmm();
  if (manual.ask(kManualProtect) != 0) failTest("KVM refused KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
  {
    vmsync::KmodPageSource source(manual.pid, guestRanges(), 4096);
    checkLockstepRounds(manual, source, kRounds, "manual protect, KVM_CLEAR_DIRTY_LOG");
  }
  {
    // A ring smaller than one round's pages: the harvest must ask for a rescan.
    vmsync::KmodPageSource source(manual.pid, guestRanges(), 64);
    manual.ask(kRunRound);
    vmsync::DirtyUnits units = source.harvest();
    if (!units.everything || units.units.size() != 64)
      failTest(fmt::format("a full ring of 64 gave {} units and no rescan", units.units.size()));
    std::printf("RING_FULL_OK: %s\n", units.rescanReason.c_str());
  }
  {
    // A controller killed while attached: the kernel closes its file and
    // the module restores the slot.
    int ready[2];
    if (::pipe(ready) < 0) vmsync::throwLastErrno("pipe");
    std::fflush(stdout);
    const pid_t controller = ::fork();
    if (controller == 0) {
      try {
        vmsync::KmodPageSource source(manual.pid, guestRanges(), 4096);
        writeAll(ready[1], "a", 1);
        ::pause();
      } catch (const std::exception& e) {
        std::printf("FAIL: controller: %s\n", e.what());
      }
      std::_Exit(1);
    }
    ::close(ready[1]);
    char attached;
    if (::read(ready[0], &attached, 1) != 1) failTest("the controller process did not attach");
    ::close(ready[0]);
    if (manual.ask(kQueryDirtyLog) != 0) failTest("controller attached but the slot does not log");
    ::kill(controller, SIGKILL);
    ::waitpid(controller, nullptr, 0);
    if (manual.ask(kQueryDirtyLog) != ENOENT)
      failTest("after the controller was killed the slot still logs");
    std::printf("CONTROLLER_KILL9_OK\n");
  }
  if (manual.ask(kQueryDirtyLog) != ENOENT)
    failTest("manual protect: slot logging not off after close");
  ::close(manual.commands);
  int status = 0;
  ::waitpid(manual.pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failTest("manual protect: the VMM failed");
  std::printf("MANUAL_PROTECT_OK\n");
  checkBackings();
  std::printf("KMOD_TEST_DONE\n");
  return 0;
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  try {
    return run();
  } catch (const std::exception& e) {
    failTest(e.what());
  }
}
