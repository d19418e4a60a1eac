// Entry point shared by `vmsync server` and `vmsync-server`.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

namespace vmsync {

struct ServerOptions {
  std::string listen = "127.0.0.1:7400";
  std::string dataDir = "vmsync-server-data";
  std::string tlsDir;                  // identity from `vmsync init`; empty with `insecure`
  bool insecure = false;               // plain TCP, every client trusted
  std::uint64_t compactAfter = 128;    // checkpoints after the base; 0: never by count
  std::uint64_t compactAboveMb = 1024; // MiB of checkpoints after the base; 0: never by size
  double leaseTimeoutSeconds = 30;     // an active device silent this long may be failed over (--force)
  int deadLinkSeconds = 20;            // a silent connection from a device is given up after this long
  std::string auditPath;               // the audit log; empty: audit.jsonl in the data directory
  bool setAsideDamagedHead = false;    // see StoreRecovery
  std::uint64_t maxMessageMb = 2048;   // largest message from an authorized connection
  std::uint64_t maxUserInFlightMb = 4096;  // messages being received at once by one user's connections
  std::uint64_t maxInFlightMb = 1024;  // messages being received at once by all connections (then they wait)
  std::uint64_t maxConcurrentPushes = 64;  // pushes being checked and stored at once (then they wait)
  std::uint64_t maxConcurrentFolds = 2;    // chains being folded at once (the others' folds wait)
  std::uint64_t maxVmsPerUser = 16;    // VMs one user may hold (0: no limit)
  std::uint64_t maxUserStoredMb = 0;   // MiB of checkpoints one user may store (0: no limit)
  double maxUserCheckpointRate = 0;    // checkpoints per second one user may push (0: no limit)
  std::string metricsListen;           // host:port of the Prometheus endpoint; empty: none
};

/// Declares the server's options on `app`.
void addServerOptions(CLI::App& app, ServerOptions& options);

/// Runs the server until SIGINT or SIGTERM; returns the process exit code.
int runServer(const ServerOptions& options);

}  // namespace vmsync
