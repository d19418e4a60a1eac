#include "vmm/qemu_vm.h"

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string_view>
#include <fstream>
#include <sstream>
#include <thread>

#include "base/durable_file.h"
#include "base/error.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

/// Owns a file descriptor.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

/// Starts argv[0] with stdout/stderr appended to `logPath`; returns its pid.
pid_t spawn(const std::vector<std::string>& argv, const std::string& logPath) {
  int log = ::open(logPath.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log < 0) throwLastErrno(fmt::format("cannot open VMM log {}", logPath));
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(log);
    throwErrno(err, "cannot fork to start QEMU");
  }
  if (pid == 0) {
    // A VMM outliving its controller would go on changing an image nobody
    // harvests any more: it goes when the controller goes.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::dup2(log, STDOUT_FILENO);
    ::dup2(log, STDERR_FILENO);
    int null = ::open("/dev/null", O_RDONLY);
    if (null >= 0) ::dup2(null, STDIN_FILENO);
    ::setpgid(0, 0);  // a Ctrl-C at the controller's terminal is the controller's to handle
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(log);
  return pid;
}

bool reap(pid_t pid, std::chrono::milliseconds wait) {
  auto deadline = std::chrono::steady_clock::now() + wait;
  while (true) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno == ECHILD)) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace

QemuVm::QemuVm(VmConfig config) : config_(std::move(config)) {
  fs::create_directories(config_.runDir);
  // QEMU appends to these: what the guest printed is the guest's.
  makePrivateFile(config_.serialLogPath);
  makePrivateFile(config_.runDir + "/qemu.log");
  std::string socket = config_.runDir + "/qmp.sock";
  fs::remove(socket);
  auto argv = commandLine();
  spdlog::debug("starting {}", fmt::join(argv, " "));
  pid_ = spawn(argv, config_.runDir + "/qemu.log");
  // Wait for the monitor, watching for an early exit so that a bad command line
  // is reported with QEMU's own words instead of a time-out.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!qmp_) {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      fail("QEMU exited while starting: {}", logTail());
    }
    if (fs::exists(socket)) {
      try {
        qmp_ = std::make_unique<QmpClient>(socket, std::chrono::milliseconds(2000));
        break;
      } catch (const Error&) {
        if (std::chrono::steady_clock::now() > deadline) throw;
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid_, SIGKILL);
      reap(pid_, std::chrono::seconds(5));
      pid_ = -1;
      fail("QEMU did not open its monitor within 30 s: {}", logTail());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

QemuVm::~QemuVm() {
  qmp_.reset();
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    reap(pid_, std::chrono::seconds(5));
  }
}

std::vector<std::string> QemuVm::commandLine() const {
  const std::uint64_t mib = config_.memoryBytes >> 20;
  std::vector<std::string> argv = {
      config_.qemuBinary,
      "-name", "vmsync",
      "-accel", config_.accel,
      "-machine", "q35,memory-backend=ram0",
      "-m", fmt::format("{}M", mib),
      "-object", fmt::format("memory-backend-file,id=ram0,size={}M,mem-path={},share=on", mib, config_.ramPath),
      "-cpu", config_.cpuModel,
      "-smp", std::to_string(config_.vcpus),
      "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
      "-kernel", config_.kernelPath,
      "-initrd", config_.initrdPath,
      "-append", config_.kernelCmdline,
      "-drive", fmt::format("file={},format=raw,if=virtio,cache={},discard=off", config_.diskPath, config_.diskCache),
      "-chardev", fmt::format("file,id=serial0,path={},append=on", config_.serialLogPath),
      "-serial", "chardev:serial0",
      "-qmp", fmt::format("unix:{}/qmp.sock,server=on,wait=off", config_.runDir),
      // A second monitor for tools beside the daemon (`vmsync bench switch`
      // drives QEMU's own migration through it): a QMP socket takes one client.
      "-qmp", fmt::format("unix:{}/tools-qmp.sock,server=on,wait=off", config_.runDir),
      "-no-reboot",
      "-S",
  };
  if (config_.freePageReporting) {
    // Pages the guest reports free are discarded by QEMU: in a shared RAM
    // file, a hole punched into it, which reads as zeros (docs/architecture.md,
    // "Free pages"). The device is part of the migrated device state, so every
    // device of a VM must start QEMU with it or without it alike.
    argv.push_back("-device");
    argv.push_back("virtio-balloon-pci,id=balloon0,free-page-reporting=on");
  }
  if (config_.incoming) {
    argv.push_back("-incoming");
    argv.push_back("defer");
  }
  return argv;
}

std::string QemuVm::logTail() const {
  std::ifstream in(config_.runDir + "/qemu.log");
  std::stringstream text;
  text << in.rdbuf();
  std::string s = text.str();
  if (s.size() > 2000) s = s.substr(s.size() - 2000);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s.empty() ? "(no output)" : s;
}

void QemuVm::stop() { qmp_->execute("stop"); }

void QemuVm::cont() {
  // After a migration (a device-state save) query-migrate says "completed"
  // while QEMU's runstate is still finish-migrate, until its migration thread
  // has finished up; `cont` is refused until then. Seen on a slow host.
  qmp_->executeWhenAllowed("cont", nullptr, "Migration is not finalized yet", std::chrono::milliseconds(1),
                           std::chrono::seconds(30));
}

std::string QemuVm::status() { return qmp_->execute("query-status").value("status", "unknown"); }

void QemuVm::waitMigration(const char* what) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (true) {
    auto info = qmp_->execute("query-migrate");
    std::string status = info.value("status", "");
    if (status == "completed") return;
    if (status == "failed" || status == "cancelled")
      fail("{} failed: {}", what, info.value("error-desc", status));
    if (std::chrono::steady_clock::now() > deadline) fail("{} did not complete within 120 s (status {})", what, status);
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
}

std::vector<std::byte> QemuVm::saveDeviceState() {
  qmp_->execute("migrate-set-capabilities",
                {{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", true}}}}});
  Fd mem(::memfd_create("vmsync-device-state", MFD_CLOEXEC));
  if (mem.fd < 0) throwLastErrno("cannot create a memfd for the device state");
  qmp_->executeWithFd("getfd", {{"fdname", "vmsync-state"}}, mem.fd);
  qmp_->execute("migrate", {{"uri", "fd:vmsync-state"}});
  waitMigration("saving device state");
  struct stat st {};
  if (::fstat(mem.fd, &st) != 0) throwLastErrno("cannot stat the device state memfd");
  std::vector<std::byte> state(static_cast<std::size_t>(st.st_size));
  std::size_t done = 0;
  while (done < state.size()) {
    ssize_t n = ::pread(mem.fd, state.data() + done, state.size() - done, static_cast<off_t>(done));
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      throwLastErrno("cannot read the device state memfd");
    }
    done += static_cast<std::size_t>(n);
  }
  if (state.empty()) fail("QEMU saved an empty device state");
  return state;
}

void QemuVm::loadDeviceState(std::span<const std::byte> state) {
  if (!config_.incoming) fail("this VMM was not started to receive a device state");
  qmp_->execute("migrate-set-capabilities",
                {{"capabilities", {{{"capability", "x-ignore-shared"}, {"state", true}}}}});
  Fd mem(::memfd_create("vmsync-device-state", MFD_CLOEXEC));
  if (mem.fd < 0) throwLastErrno("cannot create a memfd for the device state");
  std::size_t done = 0;
  while (done < state.size()) {
    ssize_t n = ::write(mem.fd, state.data() + done, state.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throwLastErrno("cannot fill the device state memfd");
    }
    done += static_cast<std::size_t>(n);
  }
  ::lseek(mem.fd, 0, SEEK_SET);
  qmp_->executeWithFd("getfd", {{"fdname", "vmsync-state"}}, mem.fd);
  qmp_->execute("migrate-incoming", {{"uri", "fd:vmsync-state"}});
  waitMigration("loading device state");
}

void QemuVm::quit() {
  if (pid_ <= 0) return;
  try {
    qmp_->execute("quit");
  } catch (const Error& e) {
    spdlog::debug("QMP quit: {}", e.what());
  }
  qmp_.reset();
  if (!reap(pid_, std::chrono::seconds(10))) {
    spdlog::warn("QEMU {} did not quit within 10 s; killing it", pid_);
    ::kill(pid_, SIGKILL);
    reap(pid_, std::chrono::seconds(5));
  }
  pid_ = -1;
}

std::string readImageCmdline(const std::string& imageDir) {
  std::string cmdline = readWholeFile(imageDir + "/cmdline", 4096);
  while (!cmdline.empty() && (cmdline.back() == '\n' || cmdline.back() == ' ')) cmdline.pop_back();
  return cmdline;
}

std::string resolveAccel(const std::string& requested, const VmConfig& probe, std::chrono::seconds limit) {
  if (requested == "tcg") return "tcg";
  if (requested != "kvm" && requested != "auto") fail("--accel must be auto, kvm or tcg, not '{}'", requested);
  int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    int err = errno;
    if (requested == "kvm") throwErrno(err, "--accel kvm: cannot open /dev/kvm");
    spdlog::info("accel auto: /dev/kvm is not usable ({}); using tcg", std::strerror(err));
    return "tcg";
  }
  ::close(kvm);
  if (requested == "kvm") return "kvm";
  // Boot the real guest under KVM, throw-away: RAM in a scratch file, disk
  // through a snapshot overlay, and watch the console for the guest's init.
  fs::path dir = fs::path(probe.runDir) / "accel-probe";
  fs::remove_all(dir);
  fs::create_directories(dir);
  VmConfig config = probe;
  config.accel = "kvm";
  config.incoming = false;
  config.runDir = dir.string();
  config.ramPath = (dir / "ram.img").string();
  config.serialLogPath = (dir / "serial.log").string();
  {
    int fd = ::open(config.ramPath.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(config.memoryBytes)) != 0)
      throwLastErrno("cannot create the accel probe's RAM file");
    ::close(fd);
  }
  // The probe must not change the real disk: copy-on-write overlay in QEMU.
  std::string reason;
  bool booted = false;
  try {
    VmConfig overlay = config;
    overlay.diskPath = config.diskPath + ",snapshot=on";
    QemuVm vm(overlay);
    vm.cont();
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(config.serialLogPath);
      std::stringstream text;
      text << in.rdbuf();
      if (text.str().find("vmsync-guest:") != std::string::npos) {
        booted = true;
        break;
      }
      if (vm.status() != "running") {
        reason = fmt::format("the guest stopped ({})", vm.status());
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (!booted && reason.empty()) reason = fmt::format("the guest did not reach user space within {} s", limit.count());
    vm.quit();
  } catch (const Error& e) {
    reason = e.what();
  }
  fs::remove_all(dir);
  if (booted) {
    spdlog::info("accel auto: the guest boots under KVM; using kvm");
    return "kvm";
  }
  spdlog::info("accel auto: KVM cannot boot this guest ({}); falling back to tcg", reason);
  return "tcg";
}

}  // namespace vmsync
