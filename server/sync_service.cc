#include "sync_service.h"

#include <spdlog/spdlog.h>

#include "base/error.h"
#include "server_metrics.h"
#include "sync_server.h"
#include "transport/rpc_util.h"

namespace vmsync {

namespace {

class DeviceSessionImpl final : public wire::DeviceSession::Server {
 public:
  DeviceSessionImpl(SyncServer& server, std::string id, std::uint64_t connection)
      : server_(server), alive_(server.lifetime()), id_(std::move(id)), connection_(connection) {}
  // A push still being stored keeps its session after the connection went,
  // which can outlive a VM's server that is being torn down (tests, fuzzers).
  ~DeviceSessionImpl() {
    if (!alive_.expired()) server_.unregister(id_, connection_);
  }

  kj::Promise<void> acquireLease(AcquireLeaseContext context) override {
    return guarded([&] {
      context.getResults().setEpoch(server_.acquireLease(id_));
      return kj::READY_NOW;
    });
  }
  kj::Promise<void> push(PushContext context) override {
    return guarded([&] {
      return server_.pushAsync(id_, context.getParams().getCheckpoint())
          .then([this, context](std::uint64_t stored) mutable {
            context.getResults().setSequence(stored);
            return server_.answerPush(stored);
          });
    });
  }
  kj::Promise<void> releaseLease(ReleaseLeaseContext context) override {
    return guarded([&] {
      server_.releaseLease(id_, context.getParams().getEpoch());
      return kj::READY_NOW;
    });
  }
  kj::Promise<void> renewLease(RenewLeaseContext context) override {
    return guarded([&] {
      server_.renewLease(id_, context.getParams().getEpoch());
      return kj::READY_NOW;
    });
  }

 private:
  SyncServer& server_;  // VMs live as long as the server process
  std::weak_ptr<void> alive_;  // expired once server_ is gone
  std::string id_;
  std::uint64_t connection_;
};

class SyncServiceImpl final : public wire::SyncServer::Server {
 public:
  SyncServiceImpl(VmCatalog& catalog, PeerIdentity peer, std::shared_ptr<ConnectionGate> gate)
      : catalog_(catalog), peer_(std::move(peer)), gate_(std::move(gate)) {}

  kj::Promise<void> register_(RegisterContext context) override {
    return guarded([&] {
      auto params = context.getParams();
      std::string id = params.getDeviceId();
      if (peer_.authenticated && id != peer_.device)
        catalog_.refuse(peer_, "register",
                        fmt::format("this connection is authenticated as {}; it cannot register as device {}",
                                    peer_.describe(), id));
      SyncServer& server = authorized(params.getVm(), "use", /*create=*/true);
      return server
          .registerDevice(id, params.getPeer(), params.getAppliedSequence(), params.getAppliedEpoch(),
                          params.getDiverged())
          .then([&server, id, context](std::uint64_t connection) mutable {
            auto results = context.getResults();
            results.setSession(kj::heap<DeviceSessionImpl>(server, id, connection));
            results.setVmId(server.vmId());
            results.setHeadSequence(server.head());
            results.setParked(server.parked());
            results.setLeaseTimeoutMs(static_cast<std::uint64_t>(server.leaseTimeout().count()));
          });
    });
  }
  kj::Promise<void> status(StatusContext context) override {
    return guarded([&] {
      authorized(context.getParams().getVm(), "list").fillStatus(context.getResults().initStatus());
      return kj::READY_NOW;
    });
  }
  kj::Promise<void> switchTo(SwitchToContext context) override {
    return guarded([&] {
      auto params = context.getParams();
      SyncServer& server = authorized(params.getVm(), "switch");
      std::string target = params.getTarget();
      const bool force = params.getForce();
      const char* action = force ? "failover" : "switch";
      auto report = context.getResults().initReport();
      return server.switchTo(target, force, report)
          .then(
              [this, &server, action, target, report]() mutable {
                if (auto* metrics = server.metrics()) metrics->switched(action, report.asReader());
                server.audit({.action = action, .result = "done", .user = peer_.user, .device = peer_.device,
                              .reason = fmt::format("from {} to {}, lease epoch {}",
                                                    report.getFrom().size() ? report.getFrom().cStr() : "(none)",
                                                    target, report.getEpoch())});
              },
              [this, &server, action, target](kj::Exception&& e) {
                if (auto* metrics = server.metrics()) metrics->switchFailed(action);
                server.audit({.action = action, .result = "failed", .user = peer_.user, .device = peer_.device,
                              .reason = fmt::format("to {}: {}", target, describe(e))});
                kj::throwFatalException(kj::mv(e));
              });
    });
  }
  kj::Promise<void> stop(StopContext context) override {
    return guarded([&] {
      return authorized(context.getParams().getVm(), "stop").stop(context.getResults().initReport());
    });
  }
  kj::Promise<void> listVms(ListVmsContext context) override {
    return guarded([&] {
      // Listing one's own VMs needs no VM: it does not lift the connection's limits.
      const std::vector<SyncServer*> vms = catalog_.vmsOf(peer_);
      auto list = context.getResults().initVms(static_cast<unsigned>(vms.size()));
      for (unsigned i = 0; i < vms.size(); ++i) vms[i]->fillSummary(list[i]);
      return kj::READY_NOW;
    });
  }

 private:
  /// The VM `name` if the peer may `action` it; from then on its connection
  /// may send messages as large as checkpoints.
  SyncServer& authorized(const std::string& name, const char* action, bool create = false) {
    SyncServer& server = catalog_.vm(peer_, name, action, create);
    if (gate_) gate_->authorize();
    return server;
  }

  VmCatalog& catalog_;
  PeerIdentity peer_;
  std::shared_ptr<ConnectionGate> gate_;
};

}  // namespace

wire::SyncServer::Client syncServiceClient(VmCatalog& catalog, const PeerIdentity& peer,
                                           std::shared_ptr<ConnectionGate> gate) {
  return kj::heap<SyncServiceImpl>(catalog, peer, std::move(gate));
}

}  // namespace vmsync
