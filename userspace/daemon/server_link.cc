#include "daemon/server_link.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "base/error.h"
#include "transport/transfer_progress.h"

namespace vmsync {

ServerLink::ServerLink(kj::AsyncIoContext& io, const DeviceOptions& options,
                       std::function<wire::DevicePeer::Client()> makePeer, std::function<ChainPosition()> position)
    : io_(io),
      options_(options),
      makePeer_(std::move(makePeer)),
      position_(std::move(position)),
      transport_(transportFor(options)) {
  addressWatch_ = std::make_unique<AddressWatch>(io_.unixEventPort,
                                                 [this](const std::string& address) { onAddressGone(address); });
  if (!addressWatch_->unavailable().empty())
    spdlog::info("{}: {}; a change of this device's address is noticed by the dead-link timeout only",
                 options_.deviceId, addressWatch_->unavailable());
}

void ServerLink::onAddressGone(const std::string& address) {
  if (!connection_) return;
  const std::optional<std::string> local = connection_->localAddress();
  if (!local || *local != address) return;
  spdlog::warn("{}: this device's address {} went away; connecting to the server again from the address it has now",
               options_.deviceId, address);
  restart();
}

ClientTransport ServerLink::transportFor(const DeviceOptions& options) {
  if (options.credential.empty() || options.insecure) return clientTransport(options.credential, options.insecure);
  DeviceCredential credential = loadCredential(options.credential);
  if (credential.device != options.deviceId)
    fail("credential {} is for device {} (of user {}), not for device {}", options.credential, credential.device,
         credential.user, options.deviceId);
  return ClientTransport(credential);
}

wire::DeviceSession::Client& ServerLink::session() {
  if (!session_) fail("device {} is not connected to the server", options_.deviceId);
  return *session_;
}

kj::Promise<Registration> ServerLink::connect(ChainPosition position) {
  // An attempt that stalls (a peer that took the connection and went silent,
  // a server killed mid-handshake behind a relay) is given up after the
  // dead-link timeout, as a silent established connection is: otherwise the
  // reconnect loop would wait on it for good.
  return attempt(position).exclusiveJoin(
      io_.provider->getTimer().afterDelay(deadLinkSeconds() * kj::SECONDS).then([this]() -> Registration {
        rpcFail(fmt::format("cannot reach the sync server at {}: no registration within {} s", options_.server,
                            deadLinkSeconds()));
      }));
}

kj::Promise<Registration> ServerLink::attempt(ChainPosition position) {
  return transport_.connect(io_, options_.server)
      .catch_([this](kj::Exception&& e) -> kj::Own<RpcConnection> {
        // A connection refused, reset or cut is a server not reached (tried
        // again); anything else, such as a server whose identity is not the
        // one the credential trusts (connect() says so), is not.
        if (e.getType() == kj::Exception::Type::DISCONNECTED)
          rpcFail(fmt::format("cannot reach the sync server at {}: {}", options_.server, describe(e)));
        rpcFail(fmt::format("the sync server at {}: {}", options_.server, describe(e)));
      })
      .then([this, position](kj::Own<RpcConnection> connection) {
        connection_ = kj::mv(connection);
        // The old connection is gone, and with it every message it was sending.
        sending_.clear();
        server_ = connection_->bootstrap().castAs<wire::SyncServer>();
        auto request = server_->registerRequest();
        request.setDeviceId(options_.deviceId);
        request.setPeer(makePeer_());
        request.setAppliedSequence(position.applied);
        request.setAppliedEpoch(position.epoch);
        request.setDiverged(position.diverged);
        request.setVm(options_.vmId);
        return request.send().catch_([this](kj::Exception&& e) -> Registration {
          // A server that refuses this device's certificate says so only now.
          std::string text = transport_.explain(e);
          if (text != describe(e)) rpcFail(text);
          kj::throwFatalException(kj::mv(e));
        });
      })
      .then([this](Registration registered) {
        session_ = registered.getSession();
        if (registered.getLeaseTimeoutMs() != 0)
          leaseTimeout_ = std::chrono::milliseconds(registered.getLeaseTimeoutMs());
        spdlog::info("{}: registered with {} (VM '{}', head {})", options_.deviceId, options_.server,
                     std::string(registered.getVmId()), registered.getHeadSequence());
        watch_ = connection_->onDisconnect()
                     .then([this] { onDisconnected(); })
                     .eagerlyEvaluate([](kj::Exception&& e) { spdlog::debug("connection watch: {}", describe(e)); });
        return kj::mv(registered);
      });
}

void ServerLink::restart() {
  watch_ = nullptr;
  session_.reset();
  server_.reset();
  sending_.clear();
  connection_ = nullptr;
  reconnect_ = reconnectLoop(std::chrono::milliseconds(0))
                   .eagerlyEvaluate([](kj::Exception&& e) { spdlog::error("reconnect: {}", describe(e)); });
}

void ServerLink::onDisconnected() {
  spdlog::warn("{}: lost the connection to the server {}; reconnecting", options_.deviceId, options_.server);
  session_.reset();
  server_.reset();
  reconnect_ = reconnectLoop(std::chrono::milliseconds(200))
                   .eagerlyEvaluate([](kj::Exception&& e) { spdlog::error("reconnect: {}", describe(e)); });
}

kj::Promise<void> ServerLink::reconnectLoop(std::chrono::milliseconds delay) {
  return io_.provider->getTimer()
      .afterDelay(delay.count() * kj::MILLISECONDS)
      .then([this] { return connect(position_()); })
      .then([this](Registration registered) -> kj::Promise<void> {
        if (!onReconnected_) return kj::READY_NOW;
        return onReconnected_(kj::mv(registered));
      })
      .catch_([this, delay](kj::Exception&& e) -> kj::Promise<void> {
        if (session_) {
          spdlog::error("{}: {}", options_.deviceId, describe(e));
          return kj::READY_NOW;
        }
        // A server that cannot be reached is expected while a link is down; a
        // server that answers with a refusal (a revoked credential, another
        // user's VM) is for the person who runs the device: said once per reason.
        const std::string why = describe(e);
        if (unreachable(e)) {
          spdlog::debug("{}: reconnect failed: {}", options_.deviceId, why);
        } else if (why != lastRefusal_) {
          spdlog::error("{}: the server refuses this device: {}", options_.deviceId, why);
          lastRefusal_ = why;
        }
        // Doubled from 0.2 s up to 5 s; a restart's immediate first attempt
        // (a delay of 0, which doubling would keep at 0) is retried after 0.2 s.
        return reconnectLoop(std::clamp(delay * 2, std::chrono::milliseconds(200), std::chrono::milliseconds(5000)));
      });
}

bool ServerLink::unreachable(const kj::Exception& e) {
  return e.getType() == kj::Exception::Type::DISCONNECTED || describe(e).starts_with("cannot reach");
}

kj::Promise<Registration> ServerLink::connectWhenReachable(std::function<ChainPosition()> position) {
  return connectWhenReachable(std::move(position), std::chrono::milliseconds(200), std::chrono::milliseconds(0));
}

kj::Promise<Registration> ServerLink::connectWhenReachable(std::function<ChainPosition()> position,
                                                           std::chrono::milliseconds delay,
                                                           std::chrono::milliseconds waited) {
  return connect(position()).catch_([this, position, delay, waited](kj::Exception&& e) -> kj::Promise<Registration> {
    if (!unreachable(e)) return kj::mv(e);
    // Said at the first failure and then every 30 s or so, not at every attempt.
    constexpr std::chrono::milliseconds kEvery(30000);
    if (waited.count() == 0 || waited / kEvery != (waited + delay) / kEvery)
      spdlog::warn("{}: {}; trying again until it answers", options_.deviceId, describe(e));
    const auto next = std::min(delay * 2, std::chrono::milliseconds(5000));
    return io_.provider->getTimer().afterDelay(delay.count() * kj::MILLISECONDS).then([this, position, next, waited,
                                                                                        delay] {
      return connectWhenReachable(position, next, waited + delay);
    });
  });
}

kj::Promise<void> ServerLink::watchTransfer(std::string what, std::uint64_t bytes) {
  RpcConnection* connection = connection_.get();
  return logTransferProgress(io_.provider->getTimer(), kj::mv(what), bytes,
                             [this, connection]() -> std::optional<std::uint64_t> {
                               if (connection_.get() != connection) return std::nullopt;
                               return connection->bytesAcknowledged();
                             })
      .eagerlyEvaluate(nullptr);
}

}  // namespace vmsync
