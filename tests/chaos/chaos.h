// A seeded schedule of switches and faults against a real cluster (the
// server and three devices, each in its own network namespace, the counter
// guest running), with checkers that do not trust the code under test:
//
//  - single runner: every QEMU's query-status, polled over its tools QMP
//    socket; two answers of "running" that overlap in time fail the run;
//  - durability: every checkpoint a device logged as acknowledged (sequence,
//    lease epoch, digest of its canonical encoding) is looked up in the
//    server's data directory after every step: it is there with that digest,
//    folded into the base, or after the point of a failover and kept under
//    abandoned/ with that digest;
//  - convergence: after every step, with the links healed, one VM runs and
//    every device reaches the head (as it was when the step ended) within a
//    bound;
//  - continuity: the guest's counter, read from every device's serial log,
//    goes up by one at a time across devices, and goes back only once per
//    forced failover.
//
// A seed fixes the schedule (what happens at each step, to which device, how
// long), not the timings, which depend on the machine.
#pragma once

#include <cstdint>
#include <map>
#include <ostream>
#include <string>
#include <vector>

namespace vmsync::testing {

inline constexpr int kChaosDeadLinkSeconds = 5;

struct ChaosOptions {
  std::uint64_t seed = 1;
  int steps = 50;
  /// Where the cluster lives (server and device directories, logs, events.log).
  std::string dir;
  /// Lease timeout of the server (short, so that a long schedule fits).
  int leaseTimeoutSeconds = 3;
  /// Dead-link timeout of the server, the devices and the relays (short too;
  /// the longest outages of the schedule outlast it).
  int deadLinkSeconds = kChaosDeadLinkSeconds;
  /// Every event and check, timestamped, as it happens (besides events.log).
  std::ostream* progress = nullptr;
};

struct ChaosResult {
  std::uint64_t seed = 0;
  int steps = 0;
  /// Faults injected, by kind ("switch", "switch+cut", "flap", ...).
  std::map<std::string, int> events;
  int switchesSucceeded = 0;
  int switchesFailed = 0;  // refused or cut short by a fault: allowed, the checks still hold
  int faultsDuringSwitch = 0;  // cuts and kills that came while the switch command was still running
  int forcedFailovers = 0;     // `switch --force` after losing a device
  std::uint64_t acknowledged = 0;      // distinct (sequence, epoch) acknowledged to devices
  std::uint64_t checkedByDigest = 0;   // of which found stored with the same digest
  std::uint64_t folded = 0;            // of which folded into the base since
  std::uint64_t abandoned = 0;         // of which after a failover's point
  std::uint64_t lost = 0;              // must be 0
  int twoRunning = 0;                  // moments with two VMs running: must be 0
  std::uint64_t counterValues = 0;     // counter lines the checkers read
  std::vector<double> convergenceSeconds;
  double wallSeconds = 0;              // the whole run, the cluster's set-up included
  /// What went wrong, each naming the step; empty when the run passed.
  std::vector<std::string> failures;

  bool passed() const { return failures.empty(); }
};

/// Runs the schedule of `options.seed`. Throws vmsync::Error when the cluster
/// cannot be set up at all; a checker's finding is a failure in the result.
ChaosResult runChaos(const ChaosOptions& options);

/// The steps `seed` draws, one line each, as the run's events.log names them.
std::vector<std::string> describeSchedule(std::uint64_t seed, int steps, int deadLinkSeconds);

/// The durability checker alone, on a cluster directory runChaos() left:
/// fills the acknowledged, checked, folded, abandoned and lost counts and a
/// failure per lost checkpoint.
ChaosResult checkAcknowledged(const std::string& dir);

/// The summary table of one or more runs (a line per seed and a total).
std::string summaryTable(const std::vector<ChaosResult>& results);

/// Empty when this host can run the harness (QEMU, the guest image, network
/// namespaces), else why not.
std::string missingForChaos();

}  // namespace vmsync::testing
