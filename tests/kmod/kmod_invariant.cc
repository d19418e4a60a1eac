// The kmod page source's invariant test, run inside Debian's kernel under
// QEMU TCG with nested KVM (run_kmod_test.sh builds it static for the
// initramfs). A child process is the VMM: the minimal KVM VMM, with no dirty
// logging of its own, obeying the controller's commands (vmm_process.h).
// The parent is the controller, a separate process: it
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
#include <signal.h>
#include <sys/ioctl.h>
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
#include "vmm_process.h"

namespace {

using namespace vmsync::kmodtest;
using vmsync::testing::MiniVmm;

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
