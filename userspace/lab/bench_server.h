// `vmsync bench server`: the sync server under the load of many VMs, without
// QEMU. Synthetic devices (real RPC over TLS, real checkpoints encoded by the
// same tracker and encoder as a device's, from images that change at a given
// rate) push to, and are forwarded from, a real `vmsync server` process whose
// data directory is on the machine's disk, fsync on.
#pragma once

#include <string>
#include <vector>

namespace vmsync {

/// Settings of `vmsync bench server`.
struct BenchServerOptions {
  std::vector<int> vms{10};          // VM counts: one run each (a sweep finds the knee)
  int devices = 3;                   // per VM: one pushes, the others follow
  double intervalSeconds = 1.0;      // between two pushes of one VM
  std::uint32_t checkpointKib = 200; // changed bytes per checkpoint (random, so they do not compress)
  double seconds = 60;               // measured, after every VM's first checkpoints
  std::uint32_t imageMb = 16;        // each synthetic VM's RAM image
  std::string dir = "build/bench-server";  // identity, server data, images, server log
  std::string json;                  // also write the results here ("": no)
  double kneePushP99Ms = 1000;       // the sweep stops once p99 push latency passes this
  std::int64_t compactAfter = -1;    // passed to the server as --compact-after (-1: its default)
  std::int64_t compactAboveMb = -1;  // passed to the server as --compact-above-mb (-1: its default)
  std::uint32_t largeVmMb = 0;       // VM 0's image instead, filled with random bytes, so that its
                                     // folds are heavy; its own pushes are left out of the figures
  std::uint32_t largeVmCheckpointKib = 0;  // VM 0's changes per checkpoint (0: checkpointKib): with
                                           // compactAboveMb, VM 0 alone folds
};

/// Runs the benchmark; prints a table row per run and where the server
/// saturated. Returns the process exit code (1 when any push or forward failed).
int runBenchServer(const BenchServerOptions& options);

}  // namespace vmsync
