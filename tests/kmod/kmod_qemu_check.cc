// The kmod page source against a real QEMU (Debian's, -accel kvm on q35,
// guest RAM in a shared file as vmsync runs it), inside Debian's kernel under
// QEMU TCG. QEMU brings what the minimal VMM does not: manual dirty-log
// protection with every bit initially set, several memory slots, read-only
// ROM slots and the SMM address space. The guest is qemu_guest_bios.S.
//
//   kmod_qemu_check RAM_FILE RAM_BYTES -- QEMU COMMAND LINE...
//
// Starts QEMU, attaches to its VM through /dev/vmsync with the kmod page
// source and the q35 gfn layout, maps the RAM file as the controller does,
// and checks, harvest after harvest with the guest running, that a page
// whose content changed is reported by that harvest or the next and that
// the pages the guest never writes are never reported. Twice it has the
// guest flip PAM1, which makes QEMU rebuild its memory slots: a rescan must
// follow within a few harvests and none come elsewhere, and while PAM1 is RAM
// the page the guest writes there (in a slot QEMU made after the attach)
// must be reported like the others. Then SIGKILL of QEMU while attached.
// Prints FAIL: <why> and exits 1 on the first violation.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "harvest/kmod_page_source.h"

namespace {

constexpr std::uint64_t kFirstPage = 0x10;  // the guest writes pages 0x10, 0x12, ... 0x8e
constexpr std::uint64_t kEndPage = 0x90;
constexpr std::uint64_t kPamPage = 0xc0;  // written while PAM1 is RAM
constexpr std::size_t kMailbox = 0x9000;  // the guest flips PAM1 when this byte changes
constexpr int kHarvests = 40;
constexpr int kPamFlips[] = {10, 25};  // after these harvests
constexpr int kRescanWindow = 3;       // harvests after a flip that may ask for a rescan

[[noreturn]] void failTest(const std::string& why) {
  std::printf("FAIL: %s\n", why.c_str());
  std::fflush(stdout);
  std::exit(1);
}

bool neverWritten(std::uint64_t unit) {
  return unit >= kFirstPage && unit < kEndPage && unit % 2 == 1;
}

int run(const std::string& ramPath, std::uint64_t ramBytes, char** qemuArgv) {
  std::fflush(stdout);
  const pid_t qemu = ::fork();
  if (qemu < 0) vmsync::throwLastErrno("fork");
  if (qemu == 0) {
    ::execv(qemuArgv[0], qemuArgv);
    std::printf("FAIL: cannot run %s: %s\n", qemuArgv[0], std::strerror(errno));
    std::_Exit(127);
  }

  // Wait for QEMU's VM and for the guest to have written its first round.
  std::uint8_t* ram = nullptr;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (true) {
    if (std::chrono::steady_clock::now() > deadline)
      failTest("QEMU's guest did not start within 60 s");
    if (::waitpid(qemu, nullptr, WNOHANG) == qemu) failTest("QEMU exited");
    if (!ram) {
      int fd = ::open(ramPath.c_str(), O_RDWR);
      struct stat st {};
      if (fd >= 0 && ::fstat(fd, &st) == 0 && static_cast<std::uint64_t>(st.st_size) >= ramBytes) {
        void* mapped = ::mmap(nullptr, ramBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mapped == MAP_FAILED) vmsync::throwLastErrno("cannot map the RAM file");
        ram = static_cast<std::uint8_t*>(mapped);
      }
      if (fd >= 0) ::close(fd);
    }
    if (ram && ram[kFirstPage * 4096] != 0 && vmsync::findKvmVmFd(qemu) >= 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }

  vmsync::KmodPageSource source(qemu, vmsync::qemuQ35GfnRanges(ramBytes), 1u << 16);
  std::printf("attached to QEMU pid %d: %u slot(s) followed\n", qemu, source.slots());
  // The first harvest after the attach is the baseline: with KVM's
  // initially-set manual protection it holds every page of every slot.
  vmsync::DirtyUnits first = source.harvest();
  std::printf("first harvest: %zu units%s\n", first.units.size(),
              first.everything ? " and a rescan" : "");

  // The pages checked: the even and odd ones of the range, and PAM1's.
  std::vector<std::uint64_t> pages;
  for (std::uint64_t p = kFirstPage; p < kEndPage; ++p) pages.push_back(p);
  pages.push_back(kPamPage);
  std::vector<std::uint8_t> seen(kPamPage + 1);
  for (auto p : pages) seen[p] = ram[p * 4096];
  std::set<std::uint64_t> owed;
  std::size_t changed = 0, reported = 0, outside = 0, pamChanged = 0, rescans = 0;
  int lastFlip = -100, flipsAnswered = 0;
  bool flipAnswered = true;
  for (int h = 0; h < kHarvests; ++h) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    vmsync::DirtyUnits units = source.harvest();
    const std::set<std::uint64_t> set(units.units.begin(), units.units.end());
    if (units.everything) {
      // Only a slot change may cost a rescan; it covers every page.
      if (h - lastFlip > kRescanWindow)
        failTest(fmt::format("harvest {}: rescan asked: {}", h, units.rescanReason));
      ++rescans;
      if (!flipAnswered) ++flipsAnswered;
      flipAnswered = true;
    } else {
      for (auto unit : owed)
        if (!set.count(unit))
          failTest(
              fmt::format("page {:#x} changed before harvest {} and was in neither it nor the next",
                          unit, h - 1));
    }
    owed.clear();
    for (auto unit : set) {
      // A rescan may over-report: a slot QEMU re-created comes with every
      // bit set (manual protection, initially set).
      if (neverWritten(unit) && !units.everything)
        failTest(fmt::format("harvest {}: page {:#x} is never written but was reported", h, unit));
      if (unit < kFirstPage || unit >= kEndPage) ++outside;
    }
    for (auto p : pages) {
      const std::uint8_t now = ram[p * 4096];
      if (now == seen[p]) continue;
      seen[p] = now;
      ++changed;
      if (p == kPamPage) ++pamChanged;
      if (!units.everything && !set.count(p)) owed.insert(p);
    }
    reported += set.size();
    if (!flipAnswered && h - lastFlip >= kRescanWindow)
      failTest(fmt::format("no rescan within {} harvests of the guest's PAM1 flip", kRescanWindow));
    for (int flip : kPamFlips)
      if (h == flip) {
        ram[kMailbox]++;  // the guest flips PAM1 at the end of its round
        lastFlip = h;
        flipAnswered = false;
      }
  }
  if (changed == 0) failTest("the guest changed no page");
  if (pamChanged == 0) failTest("the page behind PAM1 never changed: the guest did not flip PAM1");
  std::printf(
      "QEMU_KMOD_OK: %d harvests, %zu pages reported (%zu outside the written range), %zu seen "
      "changed "
      "(%zu in the slot the PAM1 flip made), each in its harvest or the next; %zu rescans for %d "
      "flips\n",
      kHarvests, reported, outside, changed, pamChanged, rescans, flipsAnswered);

  ::kill(qemu, SIGKILL);
  ::waitpid(qemu, nullptr, 0);
  try {
    source.harvest();
    failTest("harvest after QEMU was killed did not fail");
  } catch (const vmsync::Error& e) {
    std::printf("QEMU_KILL9_OK: %s\n", e.what());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 5 || std::string(argv[3]) != "--") {
    std::fprintf(stderr, "usage: %s RAM_FILE RAM_BYTES -- QEMU COMMAND LINE...\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1], std::stoull(argv[2]), argv + 4);
  } catch (const std::exception& e) {
    failTest(e.what());
  }
}
