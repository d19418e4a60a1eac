// `vmsync bench switch`: switch latency over emulated mobile links, next to
// QEMU's own live migration of the same VM over the same link.
#pragma once

#include <string>
#include <vector>

namespace vmsync {

/// Settings of `vmsync bench switch`.
struct BenchSwitchOptions {
  std::vector<std::string> profiles{"wifi"};  // link profiles (network_lab.h), one table each
  int runs = 5;                               // switches per profile (A -> B, B -> A, ...)
  std::string imageDir = "build/vm-images/counter";
  std::string outDir = "build/bench-switch";  // state of the server and devices, logs
  std::string accel = "tcg";
  double intervalSeconds = 1.0;               // the active device's checkpoint interval
  double settleSeconds = 5.0;                 // checkpoints before each measurement
  bool qemuMigration = true;                  // also measure QEMU's live migration
  int migrationTimeoutSeconds = 120;          // a migration not done by then is cancelled
  std::uint32_t targetSwitchMs = 0;           // passed to the devices (adaptive interval); 0: fixed interval
  std::string initialSyncProfile;             // the links' profile for the initial sync; "": the measured one
  std::uint32_t workloadSeconds = 3600;       // the guest's workload runs this long (vmsync.duration); 0: as built
};

/// Runs the benchmark (root: it makes network namespaces) and prints a table
/// per profile; returns the process exit code.
int runBenchSwitch(const BenchSwitchOptions& options);

}  // namespace vmsync
