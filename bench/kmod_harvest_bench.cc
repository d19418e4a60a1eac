// Harvest cost per round: the kmod page source (vmsync.ko reading KVM's dirty
// log) against the scan one (xxh3 of every 4 KiB unit, compared with the last
// hashes), with 1 %, 5 % and 20 % of guest pages written per round.
//
// It needs vmsync.ko and KVM, which the build machines' own kernel cannot
// load, so it runs inside Debian's kernel under QEMU TCG
// (`make bench-kmod` = tests/kmod/run_kmod_test.sh --bench), built static for
// the initramfs; Debian ships no static Google Benchmark, hence plain timing.
// `--rounds N` sets the measured rounds per share (8 unless given), `--guest-mb
// M` the guest's RAM (128 MiB unless given); the kmod test runs it with few
// rounds after its checks, in the same boot, and `make bench-kmod` with 512 MiB.
// Under TCG every instruction is emulated: compare the two sources with each
// other, not with native numbers.
//
// A child process is the VMM (tests/kvm_harness' minimal VMM with its stride
// guest, guest RAM in a memfd as QEMU's shared RAM file); the parent is the
// controller: it attaches with the kmod source and maps the same memory for
// the scan.
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "base/error.h"
#include "harvest/kmod_page_source.h"
#include "mini_vmm.h"

namespace {

using vmsync::testing::MiniVmm;
using Clock = std::chrono::steady_clock;

std::uint64_t guestBytes = 128u << 20;  // --guest-mb
constexpr std::uint64_t kUnit = 4096;
constexpr int kWarmUpRounds = 2;
constexpr int kDefaultMeasuredRounds = 8;

void writeAll(int fd, const void* data, std::size_t size) {
  if (::write(fd, data, size) != static_cast<ssize_t>(size)) vmsync::throwLastErrno("pipe write");
}

std::uint64_t readReply(int fd) {
  std::uint64_t value = 0;
  if (::read(fd, &value, sizeof value) != static_cast<ssize_t>(sizeof value))
    vmsync::fail("the VMM process stopped answering");
  return value;
}

// The VMM process: replies with its memfd's number, then runs one round per
// byte read until the pipe closes.
int runVmm(std::uint64_t strideBytes, int commands, int replies) {
  try {
    MiniVmm vmm(MiniVmm::Options{
        .memoryBytes = guestBytes, .strideBytes = strideBytes, .sharedMemory = true});
    std::uint64_t fd = static_cast<std::uint64_t>(vmm.memoryFd());
    writeAll(replies, &fd, sizeof fd);
    char command;
    while (::read(commands, &command, 1) == 1) {
      std::uint64_t round = vmm.runRound();
      writeAll(replies, &round, sizeof round);
    }
    return 0;
  } catch (const std::exception& e) {
    std::printf("VMM: %s\n", e.what());
    return 1;
  }
}

// The scan page source's work for one harvest: hash every unit, keep the
// units whose hash changed.
std::vector<std::uint64_t> scan(const std::uint8_t* memory, std::vector<std::uint64_t>& hashes) {
  std::vector<std::uint64_t> changed;
  for (std::uint64_t i = 0; i < hashes.size(); ++i) {
    const std::uint64_t hash = XXH3_64bits(memory + i * kUnit, kUnit);
    if (hash != hashes[i]) {
      changed.push_back(i);
      hashes[i] = hash;
    }
  }
  return changed;
}

/// Median, smallest and largest of one source's harvest times, in ms.
struct Spread {
  double median = 0, min = 0, max = 0;
};

Spread spread(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return {values[values.size() / 2], values.front(), values.back()};
}

/// One table cell: "median (min-max)", the medians aligned.
std::string cell(const Spread& ms) {
  return fmt::format("{:8.2f} ({:.2f}-{:.2f})", ms.median, ms.min, ms.max);
}

void printHeader(int measuredRounds) {
  std::printf(
      "harvest cost per round, kmod against scan: %llu MiB guest (%llu pages of 4 KiB) under "
      "nested KVM in QEMU TCG\n"
      "kmod = vmsync.ko's HARVEST ioctl plus draining its ring; scan = xxh3 of every page, "
      "compared with the last hashes\n"
      "ms of wall-clock time per harvest, median (min-max) of %d rounds after %d warm-up rounds; "
      "the CPU is emulated: compare the two columns with each other, not with native numbers\n",
      static_cast<unsigned long long>(guestBytes >> 20),
      static_cast<unsigned long long>(guestBytes / kUnit), measuredRounds, kWarmUpRounds);
  std::printf("%-19s | %-26s | %-26s | %-14s | %-10s | %s\n", "written per round", "kmod ms", "scan ms",
              "kmod us/page", "scan/kmod", "pages per round: kmod reported, scan found");
}

void measure(int percent, int measuredRounds) {
  const std::uint64_t dataPages = (guestBytes - MiniVmm::kDataStart) / kUnit;
  const std::uint64_t stridePages = 100 / percent;
  const std::uint64_t strideBytes = stridePages * kUnit;
  int toChild[2], fromChild[2];
  if (::pipe(toChild) < 0 || ::pipe(fromChild) < 0) vmsync::throwLastErrno("pipe");
  std::fflush(stdout);
  const pid_t pid = ::fork();
  if (pid < 0) vmsync::throwLastErrno("fork");
  if (pid == 0) {
    ::close(toChild[1]);
    ::close(fromChild[0]);
    std::_Exit(runVmm(strideBytes, toChild[0], fromChild[1]));
  }
  ::close(toChild[0]);
  ::close(fromChild[1]);
  const int remoteMemoryFd = static_cast<int>(readReply(fromChild[0]));

  // The controller's view of guest RAM, as it maps QEMU's RAM file.
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  const int memoryFd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, remoteMemoryFd, 0));
  if (pidfd < 0 || memoryFd < 0) vmsync::throwLastErrno("pidfd_getfd of the guest memory");
  void* mapped = ::mmap(nullptr, guestBytes, PROT_READ, MAP_SHARED, memoryFd, 0);
  if (mapped == MAP_FAILED) vmsync::throwLastErrno("cannot map guest memory");
  const auto* memory = static_cast<const std::uint8_t*>(mapped);

  vmsync::KmodPageSource source(
      pid, {{.firstGfn = 0, .pages = guestBytes / kUnit, .firstUnit = 0}}, 1u << 16);
  std::vector<std::uint64_t> hashes(guestBytes / kUnit, 0);
  std::vector<double> kmodMs, scanMs;
  std::size_t reported = 0, changed = 0;
  for (int round = 0; round < kWarmUpRounds + measuredRounds; ++round) {
    const char run = 'r';
    writeAll(toChild[1], &run, 1);
    readReply(fromChild[0]);
    const auto t0 = Clock::now();
    vmsync::DirtyUnits units = source.harvest();
    const auto t1 = Clock::now();
    std::vector<std::uint64_t> scanned = scan(memory, hashes);
    const auto t2 = Clock::now();
    if (round < kWarmUpRounds) continue;
    if (units.everything) vmsync::fail("kmod asked for a rescan: {}", units.rescanReason);
    // Every unit whose content changed must be among those kmod reported.
    const std::set<std::uint64_t> set(units.units.begin(), units.units.end());
    for (auto unit : scanned)
      if (!set.count(unit))
        vmsync::fail("{}%: unit {} changed but kmod did not report it", percent, unit);
    kmodMs.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    scanMs.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
    reported += units.units.size();
    changed += scanned.size();
  }
  ::close(toChild[1]);
  ::waitpid(pid, nullptr, 0);
  ::munmap(mapped, guestBytes);
  ::close(memoryFd);
  ::close(pidfd);
  const Spread kmod = spread(kmodMs), scanned = spread(scanMs);
  const std::uint64_t written = (dataPages + stridePages - 1) / stridePages;
  std::printf("%3d %% (%6llu pages) | %-26s | %-26s | %14.2f | %10.1f | %zu, %zu\n", percent,
              static_cast<unsigned long long>(written), cell(kmod).c_str(), cell(scanned).c_str(),
              kmod.median * 1000.0 / static_cast<double>(written), scanned.median / kmod.median,
              reported / measuredRounds, changed / measuredRounds);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  int measuredRounds = kDefaultMeasuredRounds;
  bool usage = false;
  for (int i = 1; i < argc; i += 2) {
    const std::string option = argv[i];
    if (i + 1 >= argc) {
      usage = true;
    } else if (option == "--rounds") {
      measuredRounds = std::atoi(argv[i + 1]);
    } else if (option == "--guest-mb") {
      const long mb = std::atol(argv[i + 1]);
      usage |= mb < 16 || mb > 4096;
      guestBytes = static_cast<std::uint64_t>(mb) << 20;
    } else {
      usage = true;
    }
  }
  if (usage || measuredRounds < 1) {
    std::fprintf(stderr,
                 "usage: %s [--rounds N] [--guest-mb M]   (N >= 1 measured rounds per share, 16 <= M <= 4096)\n",
                 argv[0]);
    return 2;
  }
  try {
    printHeader(measuredRounds);
    for (int percent : {1, 5, 20}) measure(percent, measuredRounds);
    std::printf("KMOD_BENCH_DONE\n");
    return 0;
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
}
