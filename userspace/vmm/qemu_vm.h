// Stock QEMU driven over QMP, with guest RAM in a shared file.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "vmm/qmp_client.h"

namespace vmsync {

/// Everything needed to start the VMM for one VM on one device.
struct VmConfig {
  std::string qemuBinary = "qemu-system-x86_64";
  std::string accel = "tcg";         // "kvm" or "tcg" (resolve "auto" first)
  std::string cpuModel = "qemu64";   // must be the same on every device
  std::uint64_t memoryBytes = 0;
  std::uint32_t vcpus = 1;
  std::string kernelPath;
  std::string initrdPath;
  std::string kernelCmdline;
  std::string ramPath;               // shared RAM file (memory-backend-file,share=on)
  std::string diskPath;              // raw disk image, or a block device over it
  std::string diskCache = "writeback"; // QEMU cache mode ("none" for a loop device: O_DIRECT)
  std::string serialLogPath;         // the guest's serial console, appended
  std::string runDir;                // QMP socket and the VMM's own log go here
  bool incoming = false;             // start with -incoming defer, to load device state
  bool freePageReporting = false;    // a virtio-balloon with free page reporting (the VM's spec says)
};

/// A running QEMU process. The destructor kills it if it still runs.
class QemuVm {
 public:
  /// Starts QEMU and connects to its monitor. Throws Error with the tail of
  /// QEMU's own log when it exits early.
  explicit QemuVm(VmConfig config);
  ~QemuVm();
  QemuVm(const QemuVm&) = delete;
  QemuVm& operator=(const QemuVm&) = delete;

  pid_t pid() const { return pid_; }
  const VmConfig& config() const { return config_; }
  QmpClient& qmp() { return *qmp_; }

  /// Pauses the guest's CPUs (QEMU also flushes the disk).
  void stop();
  /// Resumes the guest.
  void cont();
  /// QEMU's run state ("running", "paused", "inmigrate", ...).
  std::string status();

  /// Saves device/CPU state with x-ignore-shared (guest RAM left out) through a
  /// file descriptor handed to QEMU; the VM must be stopped.
  std::vector<std::byte> saveDeviceState();
  /// Loads a device state saved by saveDeviceState() into a VMM started with
  /// `incoming`. The VM stays paused until cont().
  void loadDeviceState(std::span<const std::byte> state);

  /// Asks QEMU to quit and waits for it (kills it after a grace period).
  void quit();

 private:
  std::vector<std::string> commandLine() const;
  void waitMigration(const char* what);
  std::string logTail() const;

  VmConfig config_;
  pid_t pid_ = -1;
  std::unique_ptr<QmpClient> qmp_;
};

/// The kernel command line of a guest image built by vm-images/build.sh: its
/// `cmdline` file, without the trailing newline. Throws Error when unreadable.
std::string readImageCmdline(const std::string& imageDir);

/// Resolves --accel: "kvm" and "tcg" are returned as they are (kvm is checked
/// to be usable); "auto" boots `probe` under KVM with a time limit and returns
/// "kvm" when the guest reaches user space, else "tcg", logging why. Never hangs.
std::string resolveAccel(const std::string& requested, const VmConfig& probe,
                         std::chrono::seconds limit = std::chrono::seconds(10));

}  // namespace vmsync
