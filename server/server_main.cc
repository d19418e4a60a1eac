#include "server_main.h"


#include <signal.h>
#include <sys/stat.h>
#include <spdlog/spdlog.h>

#include <kj/async-unix.h>

#include "base/durable_file.h"
#include "base/error.h"
#include "base/metrics.h"
#include "base/service_notify.h"
#include "base/version.h"
#include "transport/rpc_util.h"
#include "server_metrics.h"
#include "transport/secure_channel.h"
#include "vm_registry.h"

namespace vmsync {

void addServerOptions(CLI::App& app, ServerOptions& options) {
  app.add_option("--listen", options.listen, "address to listen on, host:port")->capture_default_str();
  app.add_option("--data", options.dataDir,
                 "data directory: every VM's checkpoints, under vms/USER/NAME (a directory from before VMs had "
                 "names is moved there at start)")
      ->capture_default_str();
  app.add_option("--max-vms-per-user", options.maxVmsPerUser,
                 "VMs one user may hold on this server; a device registering for one more is refused (0: no limit)")
      ->capture_default_str();
  app.add_option("--tls", options.tlsDir,
                 "directory with the server identity from `vmsync init`; clients must present a device credential");
  app.add_flag("--insecure", options.insecure, "plain TCP: no TLS, and any client may use the VM");
  app.add_option("--compact-after", options.compactAfter,
                 "fold the chain into a new base once this many checkpoints follow it (0: no count limit)")
      ->capture_default_str();
  app.add_option("--max-user-stored-mb", options.maxUserStoredMb,
                 "MiB of checkpoints all of one user's VMs may take on the server; a push past it is refused (the "
                 "device ships its changes later) and a fold of the chain is started (0: no limit)")
      ->capture_default_str();
  app.add_option("--max-user-checkpoint-rate", options.maxUserCheckpointRate,
                 "checkpoints per second one user's devices may push, over a burst of 10 s of them; a push past it "
                 "is refused and its changes go into a later one (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--lease-timeout", options.leaseTimeoutSeconds,
                 "seconds an active device may go without renewing its lease before `switch --force` may fail it "
                 "over (the device pauses its VM by itself after as long)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--dead-link-timeout", options.deadLinkSeconds,
                 "seconds after which a silent connection counts as dead and is closed (keepalive probes and "
                 "unacknowledged data): the device is then offline until it connects again")
      ->check(CLI::Range(kMinDeadLinkSeconds, 3600))
      ->capture_default_str();
  app.add_flag("--set-aside-damaged-head", options.setAsideDamagedHead,
               "if the newest stored checkpoint is damaged, keep it aside as N.ckpt.damaged and go on from the one "
               "before it (it may have been acknowledged: its content is lost); without this the server refuses "
               "to start");
  app.add_option("--audit", options.auditPath,
                 "audit log: a JSON line per refusal, ownership claim, lease grant, switch and failover "
                 "(default: audit.jsonl in the data directory)");
  app.add_option("--max-message-mb", options.maxMessageMb,
                 "largest message, in MiB, an authorized connection may send (until it is authorized: 64 KiB)")
      ->check(CLI::Range(1, 2048))
      ->capture_default_str();
  app.add_option("--max-user-inflight-mb", options.maxUserInFlightMb,
                 "MiB of messages all connections of one user may have under way at once; a connection that "
                 "would pass it is closed")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-inflight-mb", options.maxInFlightMb,
                 "MiB of messages all connections together may have under way at once; past it, a connection's "
                 "next message waits until others' are in (backpressure, nothing is closed)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-concurrent-pushes", options.maxConcurrentPushes,
                 "pushes, of all VMs, the server checks and stores at once; past it, a push waits for one to "
                 "finish (backpressure: its device waits for the answer, nothing is refused)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-concurrent-folds", options.maxConcurrentFolds,
                 "chains, of all VMs, the server folds at once; a fold past it waits (the chain grows meanwhile) "
                 "and starts at one of the VM's next pushes")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--metrics-listen", options.metricsListen,
                 "serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP: keep it on a trusted "
                 "network; see docs/operations.md, Metrics)");
  app.add_option("--compact-above-mb", options.compactAboveMb,
                 "fold the chain into a new base once the checkpoints after it pass this many MiB (0: no size limit)")
      ->capture_default_str();
}

int runServer(const ServerOptions& options) {
  // Before any thread starts: it takes systemd's variables out of the environment.
  const ServiceNotifier systemd;
  try {
    kj::UnixEventPort::captureSignal(SIGTERM);
    kj::UnixEventPort::captureSignal(SIGINT);
    if (options.tlsDir.empty() == !options.insecure)
      fail("give --tls DIR (a server identity from `vmsync init`) or --insecure for plain TCP, {}",
           options.insecure ? "not both" : "one of them");
    setDeadLinkSeconds(options.deadLinkSeconds);
    // The chain is the user's guest memory and disk: for the server's user alone.
    ::umask(077);
    makePrivateDirectory(options.dataDir);
    auto io = kj::setupAsyncIo();
    ServerTransport transport = options.insecure ? ServerTransport()
                                                 : ServerTransport(options.tlsDir, io.provider->getTimer());
    AuditLog audit(options.auditPath.empty() ? options.dataDir + "/audit.jsonl" : options.auditPath);
    VmSettings settings;
    settings.compaction = CompactionLimits{options.compactAfter, options.compactAboveMb << 20};
    settings.timer = &io.provider->getTimer();
    settings.recovery = StoreRecovery{options.setAsideDamagedHead};
    settings.leaseTimeout = std::chrono::milliseconds(static_cast<std::int64_t>(options.leaseTimeoutSeconds * 1000));
    settings.audit = &audit;
    settings.user.vms = options.maxVmsPerUser;
    settings.user.storedBytes = options.maxUserStoredMb << 20;
    settings.user.checkpointsPerSecond = options.maxUserCheckpointRate;
    settings.pushSlots = std::make_shared<ServerBudget>(options.maxConcurrentPushes);
    settings.foldSlots = std::make_shared<ServerBudget>(options.maxConcurrentFolds);
    std::unique_ptr<MetricsEndpoint> metricsEndpoint;
    if (!options.metricsListen.empty()) {
      settings.metrics = std::make_shared<ServerMetrics>();
      metricsEndpoint = std::make_unique<MetricsEndpoint>(options.metricsListen);
      metricsEndpoint->serve(settings.metrics);
      spdlog::info("metrics served on {} (port {}) at /metrics", options.metricsListen, metricsEndpoint->port());
    }
    VmRegistry vms(options.dataDir, settings);
    transport.setAuditLog(&audit);
    transport.setOnRevoked([&vms](const std::string& user, const std::string& device, const std::string& why) {
      vms.revoked(user, device, why);
    });
    MessageLimits limits;
    limits.perMessage = options.maxMessageMb << 20;
    limits.perUser = options.maxUserInFlightMb << 20;
    limits.perServer = options.maxInFlightMb << 20;
    transport.setLimits(limits);
    kj::Own<kj::ConnectionReceiver> listener;
    try {
      listener = io.provider->getNetwork().parseAddress(options.listen).wait(io.waitScope)->listen();
    } catch (const kj::Exception& e) {
      fail("cannot listen on {}: {}", options.listen, describe(e));
    }
    spdlog::info("vmsync {} (commit {})", buildVersion(), buildCommit());
    spdlog::info("sync server listening on {} ({}; data in {}; audit log {})", options.listen,
                 transport.secure() ? "TLS, device certificates required" : "plain TCP, INSECURE", options.dataDir,
                 audit.path());
    auto serving = transport.serve(*listener, [&vms](const PeerIdentity& peer, std::shared_ptr<ConnectionGate> gate)
                                                  -> capnp::Capability::Client {
      return syncServiceClient(vms, peer, std::move(gate));
    });
    systemd.ready(fmt::format("listening on {}", options.listen));
    auto stop = io.unixEventPort.onSignal(SIGTERM).exclusiveJoin(io.unixEventPort.onSignal(SIGINT));
    auto signal = stop.exclusiveJoin(serving.then([]() -> siginfo_t { KJ_UNREACHABLE; }))
                      .exclusiveJoin(systemd.watchdog(io.provider->getTimer()).then([]() -> siginfo_t {
                        KJ_UNREACHABLE;
                      }));
    signal.wait(io.waitScope);
    systemd.stopping("stopping");
    spdlog::info("sync server stopping");
    return 0;
  } catch (const Error& e) {
    spdlog::error("{}", e.what());
    return 1;
  } catch (const kj::Exception& e) {
    spdlog::error("{}", describe(e));
    return 1;
  } catch (const std::exception& e) {
    // A data directory it cannot use, and the like.
    spdlog::error("{}", e.what());
    return 1;
  }
}

}  // namespace vmsync
