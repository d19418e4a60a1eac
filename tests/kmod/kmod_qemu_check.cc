// The kmod page source against a real QEMU (Debian's, -accel kvm on q35,
// guest RAM in a shared file as vmsync runs it), inside Debian's kernel under
// QEMU TCG. QEMU brings what the minimal VMM does not: manual dirty-log
// protection with every bit initially set, several memory slots, read-only
// ROM slots and the SMM address space. The guest is qemu_guest_bios.S.
//
//   kmod_qemu_check RAM_FILE RAM_BYTES QMP_SOCKET -- QEMU COMMAND LINE...
//
// Starts QEMU, attaches to its VM through /dev/vmsync with the kmod page
// source and the q35 gfn layout, maps the RAM file as the controller does,
// and checks, harvest after harvest with the guest running, that a page
// whose content changed is reported by that harvest or the next and that
// the pages the guest never writes are never reported. Twice it has the
// guest flip PAM1, which makes QEMU rebuild its memory slots: a rescan must
// follow within a few harvests and none come elsewhere, and while PAM1 is RAM
// the page the guest writes there (in a slot QEMU made after the attach)
// must be reported like the others.
//
// QEMU's own writes: before the attach, a migration started over QMP (into a
// socket nobody reads, so it stays under way with QEMU logging its slots)
// must make the attach fail with the module's reason; once cancelled the
// attach succeeds. During the harvests, a byte written through QEMU's own
// mapping of the RAM file (process_vm_writev into QEMU, as virtio DMA or a
// device model writes guest RAM) into a page the guest never writes must be
// in the next harvest, and not in the one after (tracking was reset).
// Then SIGKILL of QEMU while attached.
// Prints FAIL: <why> and exits 1 on the first violation.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
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
constexpr std::uint64_t kProbeFirstPage = 0x300;  // written by the checker through QEMU's mapping
constexpr int kProbes = 8;                         // one every few harvests; odd ones above 4 GiB
constexpr int kProbeEvery = 4;

[[noreturn]] void failTest(const std::string& why) {
  std::printf("FAIL: %s\n", why.c_str());
  std::fflush(stdout);
  std::exit(1);
}

bool neverWritten(std::uint64_t unit) {
  return unit >= kFirstPage && unit < kEndPage && unit % 2 == 1;
}

// Where QEMU maps the RAM file: the start of the mapping of `ramPath` at
// file offset 0 in /proc/PID/maps.
std::uint64_t qemuRamMapping(pid_t qemu, const std::string& ramPath) {
  std::ifstream maps(fmt::format("/proc/{}/maps", qemu));
  std::string line;
  while (std::getline(maps, line)) {
    std::istringstream fields(line);
    std::string range, perms, offset, dev, inode, path;
    fields >> range >> perms >> offset >> dev >> inode >> path;
    if (path == ramPath && std::stoull(offset, nullptr, 16) == 0 && perms.find('s') != std::string::npos)
      return std::stoull(range.substr(0, range.find('-')), nullptr, 16);
  }
  failTest(fmt::format("no shared mapping of {} at offset 0 in QEMU's /proc/{}/maps", ramPath, qemu));
}

// Writes one byte into guest page `page` through QEMU's own mapping.
void writeThroughQemu(pid_t qemu, std::uint64_t mapping, std::uint64_t page, std::uint8_t value) {
  iovec local{&value, 1};
  iovec remote{reinterpret_cast<void*>(mapping + page * 4096 + 123), 1};
  if (::process_vm_writev(qemu, &local, 1, &remote, 1, 0) != 1)
    vmsync::throwLastErrno(fmt::format("process_vm_writev into QEMU's RAM at page {:#x}", page));
}

// A QMP client on QEMU's -qmp socket: one command at a time.
class Qmp {
 public:
  explicit Qmp(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      if (std::chrono::steady_clock::now() > deadline) vmsync::throwLastErrno("cannot connect to QEMU's QMP socket");
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    readReply();  // the greeting
    execute(R"({"execute":"qmp_capabilities"})");
  }
  ~Qmp() { ::close(fd_); }
  // Sends one command; returns its reply line (events before it skipped).
  std::string execute(const std::string& command) {
    const std::string line = command + "\n";
    if (::write(fd_, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
      vmsync::throwLastErrno("cannot write to QMP");
    for (;;) {
      std::string reply = readReply();
      if (reply.find("\"event\"") == std::string::npos) {
        if (reply.find("\"error\"") != std::string::npos) failTest(fmt::format("QMP {}: {}", command, reply));
        return reply;
      }
    }
  }
  // Polls query-migrate until its status is `status`.
  void waitMigration(const std::string& status) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    for (;;) {
      const std::string reply = execute(R"({"execute":"query-migrate"})");
      if (reply.find(fmt::format("\"status\": \"{}\"", status)) != std::string::npos) return;
      if (std::chrono::steady_clock::now() > deadline)
        failTest(fmt::format("the migration did not reach status {}: {}", status, reply));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

 private:
  std::string readReply() {
    for (;;) {
      const auto end = buffer_.find('\n');
      if (end != std::string::npos) {
        std::string line = buffer_.substr(0, end);
        buffer_.erase(0, end + 1);
        return line;
      }
      char chunk[4096];
      const ssize_t n = ::read(fd_, chunk, sizeof chunk);
      if (n <= 0) failTest("QMP closed");
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
  }
  int fd_ = -1;
  std::string buffer_;
};

// While a migration is under way QEMU logs its slots itself: the attach
// must be refused with that reason, and succeed once it is cancelled.
void attachDuringMigration(pid_t qemu, std::uint64_t ramBytes, const std::string& qmpPath) {
  const std::string sinkPath = "/tmp/kmod-migration.sock";
  ::unlink(sinkPath.c_str());
  const int sink = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sinkPath.c_str());
  if (::bind(sink, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(sink, 1) != 0)
    vmsync::throwLastErrno("cannot listen for the migration stream");
  Qmp qmp(qmpPath);
  // Never accepted nor read: the stream stalls once the socket buffers fill.
  qmp.execute(fmt::format(R"({{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}})", sinkPath));
  qmp.waitMigration("active");
  try {
    vmsync::KmodPageSource refused(qemu, vmsync::qemuQ35GfnRanges(ramBytes), 1u << 16);
    failTest("attached while QEMU migrates (QEMU logs its slots itself)");
  } catch (const vmsync::Error& e) {
    const std::string why = e.what();
    if (why.find("already logs") == std::string::npos)
      failTest(fmt::format("the attach during a migration failed for another reason: {}", why));
    std::printf("MIGRATION_REFUSED_OK: %s\n", why.c_str());
  }
  qmp.execute(R"({"execute":"migrate_cancel"})");
  qmp.waitMigration("cancelled");
  ::close(sink);
  ::unlink(sinkPath.c_str());
}

int run(const std::string& ramPath, std::uint64_t ramBytes, const std::string& qmpPath, char** qemuArgv) {
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

  attachDuringMigration(qemu, ramBytes, qmpPath);
  vmsync::KmodPageSource source(qemu, vmsync::qemuQ35GfnRanges(ramBytes), 1u << 16);
  const std::uint64_t qemuRam = qemuRamMapping(qemu, ramPath);
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
  const auto ranges = vmsync::qemuQ35GfnRanges(ramBytes);
  const bool highRam = ranges.size() > 1;
  for (auto p : pages) seen[p] = ram[p * 4096];
  std::set<std::uint64_t> owed;
  std::size_t changed = 0, reported = 0, outside = 0, pamChanged = 0, rescans = 0;
  int lastFlip = -100, flipsAnswered = 0;
  bool flipAnswered = true;
  // The page the checker wrote through QEMU's mapping before this harvest
  // (must be in it), and the one of the harvest before (must not be, unless
  // a rescan).
  std::uint64_t probe = 0, lastProbe = 0;
  int probes = 0;
  std::uint64_t vmmWritten = 0;
  for (int h = 0; h < kHarvests; ++h) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    vmsync::DirtyUnits units = source.harvest();
    const std::set<std::uint64_t> set(units.units.begin(), units.units.end());
    vmmWritten += source.lastVmmWritten();
    if (probe && !units.everything && !set.count(probe))
      failTest(fmt::format("harvest {}: page {:#x}, written through QEMU's mapping before it, was not reported", h,
                           probe));
    if (lastProbe && !units.everything && set.count(lastProbe))
      failTest(fmt::format("harvest {}: page {:#x}, written through QEMU's mapping only before the harvest before, "
                           "was reported again: tracking was not reset",
                           h, lastProbe));
    lastProbe = probe;
    probe = 0;
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
    // A probe away from the PAM flips, whose rescans would hide it.
    if (probes < kProbes && h % kProbeEvery == 1 && h - lastFlip > kRescanWindow) {
      // Half of them in RAM above 4 GiB, if the VM has any (its units follow the low ones).
      probe = (probes % 2 == 1 && highRam ? ranges[1].firstUnit : 0) + kProbeFirstPage +
              static_cast<std::uint64_t>(probes);
      writeThroughQemu(qemu, qemuRam, probe, static_cast<std::uint8_t>(0xa0 + probes));
      if (ram[probe * 4096 + 123] != 0xa0 + probes) failTest("the byte written through QEMU's mapping is not in the file");
      ++probes;
    }
    for (int flip : kPamFlips)
      if (h == flip) {
        ram[kMailbox]++;  // the guest flips PAM1 at the end of its round
        lastFlip = h;
        flipAnswered = false;
      }
  }
  if (changed == 0) failTest("the guest changed no page");
  if (probes < kProbes) failTest(fmt::format("only {} of {} probes were written", probes, kProbes));
  std::printf("QEMU_WRITES_OK: %d pages written through QEMU's own mapping (%s), each in the next harvest and not "
              "the one after; %llu pages in all found written by QEMU beyond KVM's log\n",
              probes, highRam ? "half of them in RAM above 4 GiB" : "all below 4 GiB",
              static_cast<unsigned long long>(vmmWritten));
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
  if (argc < 6 || std::string(argv[4]) != "--") {
    std::fprintf(stderr, "usage: %s RAM_FILE RAM_BYTES QMP_SOCKET -- QEMU COMMAND LINE...\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1], std::stoull(argv[2]), argv[3], argv + 5);
  } catch (const std::exception& e) {
    failTest(e.what());
  }
}
