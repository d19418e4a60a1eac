// The device daemon: runs the VM when active, applies checkpoints when standby.
//
// A Device coordinates role changes (standby -> active -> standby) between
// the parts it owns: the Replica (the local images and what was applied to
// them), the ServerLink (the connection to the sync server) and, while
// active, the ActiveVm (the VMM, its dirty sources and the checkpoint loop).
#pragma once

#include <cstdint>
#include <string>

#include "checkpoint/compression_choice.h"

namespace vmsync {

/// Command-line settings of `vmsync active` and `vmsync standby`.
struct DeviceOptions {
  std::string deviceId;                 // this device's name on the server
  std::string server = "127.0.0.1:7400";
  std::string credential;               // device credential from `vmsync enroll` (TLS)
  bool insecure = false;                // plain TCP instead
  std::string stateDir;                 // RAM file, disk image, serial log, ...
  std::string imageDir;                 // active only: guest image (vm-images output)
  std::string vmId;                     // the VM's name on the server; empty: the state directory's, else "vm"
  double intervalSeconds = 1.0;         // time between incremental checkpoints
  std::string accel = "auto";           // auto, kvm or tcg
  std::string qemuBinary = "qemu-system-x86_64";
  std::string pageSource = "scan";      // where dirty guest pages come from: scan, kmod (KVM only), auto
  std::string blockSource = "auto";     // where dirty disk blocks come from: bpf, scan, auto
  std::string disk = "file";            // how the VMM reaches the disk image: file, or loop (a loop device)
  CompressionSetting compression;       // auto (from the link rate), none, lz4 or zstd:LEVEL
  std::string policy = "dirty-prev";    // active only: checkpoint policy of a new VM
  std::uint32_t memoryMb = 0;           // active only: overrides the image's memory size
  std::uint32_t targetSwitchMs = 0;     // when active: pick the interval so a final checkpoint travels in this time (0: fixed)
  std::string optimize = "bytes";       // with targetSwitchMs: the longest interval (bytes) or the least energy
  std::string radio = "lte";            // with targetSwitchMs: the radio whose power model prices pushes
  double resumableEverySeconds = 10;    // when active: a consistent (resumable) checkpoint this often (0: none)
  int deadLinkSeconds = 20;             // a silent connection to the server is given up after this long
  bool fullVerify = false;              // check a final checkpoint's digest by hashing the whole image
  bool finalFullCompare = false;        // final checkpoints compare every RAM unit even with a source that sees every write
  double scrubEverySeconds = 60;        // standby: a background pass over the image this often (0: none)
  std::string metricsListen;            // host:port of the Prometheus endpoint; empty: none
};

enum class Role { active, standby };

/// Runs the daemon until SIGINT/SIGTERM; returns the process exit code.
int runDevice(const DeviceOptions& options, Role initialRole);

}  // namespace vmsync
