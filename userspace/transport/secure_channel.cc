// The transports: TLS (or plain TCP) connections from devices and to the
// server, with the server's revocation checks on live connections.
#include "transport/secure_channel.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <map>

#include "base/durable_file.h"
#include "base/error.h"
#include "transport/revocation.h"

namespace vmsync {

namespace {

/// `pem` after checking it holds what `where` should (a clear error here
/// rather than an assertion inside the TLS library).
kj::StringPtr checkedCert(const std::string& pem, const std::string& where) {
  checkCertificatePem(pem, where);
  return kj::StringPtr(pem.c_str());
}
kj::StringPtr checkedKey(const std::string& pem, const std::string& where) {
  checkKeyPem(pem, where);
  return kj::StringPtr(pem.c_str());
}

}  // namespace

// ---- client -----------------------------------------------------------------

struct ClientTransport::Tls {
  explicit Tls(const DeviceCredential& c)
      : credentialPath(c.path.empty() ? "the device credential" : c.path),
        serverName(c.serverName),
        ca(kj::StringPtr(c.caPem.c_str())),
        keypair{kj::TlsPrivateKey(kj::StringPtr(c.keyPem.c_str())),
                kj::TlsCertificate(kj::StringPtr(c.certificatePem.c_str()))},
        context(options()) {}

  kj::TlsContext::Options options() {
    kj::TlsContext::Options o;
    o.useSystemTrustStore = false;
    o.trustedCertificates = kj::arrayPtr(&ca, 1);
    o.defaultKeypair = keypair;
    return o;
  }

  std::string credentialPath;
  std::string serverName;
  kj::TlsCertificate ca;
  kj::TlsKeypair keypair;
  kj::TlsContext context;
};

namespace {

/// What a failed handshake or call means for the device holding `credential`
/// ("" when it is not about trust).
std::string trustFailure(const std::string& credential, const std::string& serverName, const std::string& what) {
  if (what.find("certificate is not trusted") != std::string::npos)
    return fmt::format("it is not the server {} was enrolled on ({}): it proves no identity of server '{}' from the "
                       "authority that credential trusts. If the device was enrolled on another server's identity, "
                       "or the server's identity was made again with `vmsync init`, enroll the device on this "
                       "server's identity; otherwise check --server",
                       credential, what, serverName);
  if (what.find(" alert ") != std::string::npos)
    return fmt::format("the server refused the certificate in {} ({}): by the server's clock it may have expired, "
                       "or the server's identity was made again; ask for a new one with `vmsync enroll` on the "
                       "server's identity",
                       credential, what);
  return {};
}

}  // namespace

std::string ClientTransport::explain(const kj::Exception& e) const {
  const std::string what = describe(e);
  if (tls_ == nullptr) return what;
  std::string why = trustFailure(tls_->credentialPath, tls_->serverName, what);
  return why.empty() ? what : why;
}

ClientTransport::ClientTransport() = default;
ClientTransport::ClientTransport(const DeviceCredential& credential) : tls_(std::make_unique<Tls>(credential)) {}
ClientTransport::~ClientTransport() = default;
ClientTransport::ClientTransport(ClientTransport&&) noexcept = default;
ClientTransport& ClientTransport::operator=(ClientTransport&&) noexcept = default;

bool ClientTransport::secure() const { return tls_ != nullptr; }

kj::Promise<kj::Own<RpcConnection>> ClientTransport::connect(kj::AsyncIoContext& io, const std::string& address) {
  Tls* tls = tls_.get();
  return io.provider->getNetwork()
      .parseAddress(address)
      .then([](kj::Own<kj::NetworkAddress> addr) { return addr->connect().attach(kj::mv(addr)); })
      .then([tls](kj::Own<kj::AsyncIoStream> stream) -> kj::Promise<kj::Own<kj::AsyncIoStream>> {
        if (tls == nullptr) return kj::mv(stream);
        return tls->context.wrapClient(kj::mv(stream), kj::StringPtr(tls->serverName.c_str()))
            .catch_([tls](kj::Exception&& e) -> kj::Own<kj::AsyncIoStream> {
              std::string why = trustFailure(tls->credentialPath, tls->serverName, describe(e));
              if (why.empty()) kj::throwFatalException(kj::mv(e));
              rpcFail(why);
            });
      })
      .then([](kj::Own<kj::AsyncIoStream> stream) {
        return kj::heap<RpcConnection>(kj::mv(stream), capnp::rpc::twoparty::Side::CLIENT,
                                       capnp::Capability::Client(nullptr));
      });
}

ClientTransport clientTransport(const std::string& credentialPath, bool insecure) {
  if (!credentialPath.empty() && insecure) fail("give either --credential or --insecure, not both");
  if (insecure) return ClientTransport();
  if (credentialPath.empty())
    fail("no credential: give --credential FILE (from `vmsync enroll`), or --insecure for plain TCP");
  return ClientTransport(loadCredential(credentialPath));
}

// ---- server -----------------------------------------------------------------

struct ServerTransport::Tls {
  Tls(const std::string& dir, kj::Timer& timer)
      : caText(readWholeFile(dir + "/ca.pem", 1 << 20)),
        keyText(readWholeFile(dir + "/server.key", 1 << 20)),
        certText(readWholeFile(dir + "/server.pem", 1 << 20)),
        ca(checkedCert(caText, dir + "/ca.pem")),
        keypair{kj::TlsPrivateKey(checkedKey(keyText, dir + "/server.key")),
                kj::TlsCertificate(checkedCert(certText, dir + "/server.pem"))},
        context(options(timer)) {
    if (std::string warning = readableByOthers(dir + "/server.key", "the server's key"); !warning.empty())
      spdlog::warn("{}", warning);
  }

  kj::TlsContext::Options options(kj::Timer& timer) {
    kj::TlsContext::Options o;
    o.useSystemTrustStore = false;
    o.verifyClients = true;
    o.trustedCertificates = kj::arrayPtr(&ca, 1);
    o.defaultKeypair = keypair;
    o.timer = timer;
    o.acceptTimeout = 10 * kj::SECONDS;  // a client that stalls its handshake is dropped
    return o;
  }

  std::string caText, keyText, certText;
  kj::TlsCertificate ca;
  kj::TlsKeypair keypair;
  kj::TlsContext context;
};

/// The server's side of revocation: the records, and the live connections
/// to close when one of their credentials is revoked.
struct ServerTransport::Revoker {
  explicit Revoker(const std::string& dir) : list(dir) {}

  struct Live {
    PeerIdentity peer;
    std::string from;
    kj::Own<kj::PromiseFulfiller<void>> close;
  };

  /// Why `peer` may not connect ("" if it may).
  std::string refusal(const PeerIdentity& peer) const {
    return list.refusal(peer.user, peer.device, peer.credential);
  }

  void refresh() {
    auto changes = list.reload();
    if (!changes.error.empty()) {
      spdlog::error("revocation records: {}; the last good ones stay in force", changes.error);
      if (audit != nullptr) audit->record({.action = "revoke", .result = "unreadable", .reason = changes.error});
    }
    for (const auto& e : changes.enrolled) {
      spdlog::info("enrolled: device {} of user {} (credential {})", e.device, e.user, e.id);
      if (audit != nullptr)
        audit->record({.action = "enroll", .result = "done", .user = e.user, .device = e.device,
                       .reason = fmt::format("credential {}", e.id)});
    }
    for (const auto& r : changes.revoked) {
      const std::string what = fmt::format("{} credential(s){}", r.ids.size(), r.reason.empty() ? "" : ": " + r.reason);
      spdlog::warn("revoked: {} of user {} ({})", r.device.empty() ? "every device" : "device " + r.device, r.user,
                   what);
      if (audit != nullptr)
        audit->record({.action = "revoke", .result = "done", .user = r.user, .device = r.device, .reason = what});
      if (onRevoked) onRevoked(r.user, r.device, what);
    }
    if (!changes.changed) return;
    for (auto it = live.begin(); it != live.end();) {
      const std::string why = refusal(it->second.peer);
      if (why.empty()) {
        ++it;
        continue;
      }
      spdlog::warn("connection from {} ({}) closed: {}", it->second.from, it->second.peer.describe(), why);
      if (audit != nullptr)
        audit->record({.action = "connect", .result = "closed", .user = it->second.peer.user,
                       .device = it->second.peer.device, .reason = why, .from = it->second.from});
      it->second.close->fulfill();
      it = live.erase(it);
    }
  }

  RevocationList list;
  AuditLog* audit = nullptr;
  OnRevoked onRevoked;
  std::map<std::uint64_t, Live> live;
  std::uint64_t next = 0;
};

ServerTransport::ServerTransport() = default;
ServerTransport::ServerTransport(const std::string& dir, kj::Timer& timer)
    : tls_(std::make_unique<Tls>(dir, timer)), revoker_(std::make_shared<Revoker>(dir)), timer_(&timer) {
  revoker_->refresh();  // the records as they are now; only later changes are news
}

void ServerTransport::setAuditLog(AuditLog* audit) {
  audit_ = audit;
  if (revoker_) revoker_->audit = audit;
}

void ServerTransport::setOnRevoked(OnRevoked onRevoked) {
  if (revoker_) revoker_->onRevoked = std::move(onRevoked);
}

ServerTransport::~ServerTransport() = default;
ServerTransport::ServerTransport(ServerTransport&&) noexcept = default;
ServerTransport& ServerTransport::operator=(ServerTransport&&) noexcept = default;

bool ServerTransport::secure() const { return tls_ != nullptr; }

namespace {

class LogRefusals final : public kj::TaskSet::ErrorHandler {
 public:
  void taskFailed(kj::Exception&& exception) override { spdlog::warn("connection refused: {}", describe(exception)); }
};

/// Parses "device@user#number" (or, from before numbers, "device@user") from
/// a device certificate.
PeerIdentity identityFrom(kj::PeerIdentity& peer) {
  auto* tls = dynamic_cast<kj::TlsPeerIdentity*>(&peer);
  if (tls == nullptr || !tls->hasCertificate()) rpcFail("the client presented no device certificate");
  std::string name = tls->getCommonName().cStr();
  PeerIdentity identity{true};
  if (const auto hash = name.rfind('#'); hash != std::string::npos) {
    identity.credential = name.substr(hash + 1);
    name.resize(hash);
  }
  const auto at = name.rfind('@');
  if (at == std::string::npos || at == 0 || at + 1 == name.size())
    rpcFail(fmt::format("the client's certificate names '{}', not a device of a user", tls->getCommonName().cStr()));
  identity.user = name.substr(at + 1);
  identity.device = name.substr(0, at);
  return identity;
}

/// "host" of "host:port" (the key under which repeated failures are counted).
std::string hostOf(const std::string& address) {
  const auto colon = address.rfind(':');
  return colon == std::string::npos ? address : address.substr(0, colon);
}

}  // namespace

kj::Promise<void> ServerTransport::serve(kj::ConnectionReceiver& listener, BootstrapFor bootstrapFor,
                                        std::uint64_t revocationCheckMs) {
  static LogRefusals refusals;
  auto tasks = kj::heap<kj::TaskSet>(refusals);
  Tls* tls = tls_.get();
  std::shared_ptr<Revoker> revoker = revoker_;
  AuditLog* audit = audit_;
  kj::Timer* timer = timer_;
  const MessageLimits limits = limits_;
  auto inFlight = inFlight_;
  if (!budget_) budget_ = std::make_shared<ServerBudget>(limits.perServer);
  auto budget = budget_;
  // Each connection's handshake runs on its own: a slow client never holds
  // up the next accept.
  auto serveOne = [=](kj::AuthenticatedStream accepted) -> kj::Promise<void> {
    std::string from = accepted.peerIdentity->toString().cStr();
    kj::Promise<kj::AuthenticatedStream> ready =
        tls != nullptr ? tls->context.wrapServer(kj::mv(accepted)) : kj::Promise<kj::AuthenticatedStream>(kj::mv(accepted));
    return ready
        .then([=](kj::AuthenticatedStream stream) -> kj::Promise<void> {
          PeerIdentity peer;
          std::string revoked;
          if (tls != nullptr) {
            peer = identityFrom(*stream.peerIdentity);
            revoker->refresh();
            revoked = revoker->refusal(peer);
          }
          spdlog::debug("connection from {}: {}", from, peer.describe());
          auto closed = [audit, peer, from](const std::string& why) {
            spdlog::warn("connection from {} ({}) closed: {}", from, peer.describe(), why);
            if (audit != nullptr)
              audit->record({.action = "connect", .result = "closed", .user = peer.user, .device = peer.device,
                             .reason = why, .from = from});
          };
          auto gate = std::make_shared<ConnectionGate>(limits, peer.user, inFlight, closed, budget);
          if (tls == nullptr) gate->authorize();  // an --insecure server trusts its network
          capnp::Capability::Client bootstrap = nullptr;
          if (!revoked.empty()) {
            // Refused with words the device can act on; the connection, never
            // authorized, closes at the deadline below.
            const std::string why = fmt::format("{} may not connect: {}; ask for a new credential with `vmsync "
                                                "enroll`", peer.describe(), revoked);
            spdlog::warn("connection from {} refused: {}", from, why);
            if (audit != nullptr)
              audit->recordLimited("revoked " + peer.user + " " + peer.device,
                                   {.action = "connect", .result = "refused", .user = peer.user,
                                    .device = peer.device, .reason = revoked, .from = from});
            bootstrap = capnp::Capability::Client(
                kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::str(why.c_str())));
          } else {
            bootstrap = bootstrapFor(peer, gate);
          }
          auto connection = kj::heap<RpcConnection>(gatedStream(kj::mv(stream.stream), gate),
                                                    capnp::rpc::twoparty::Side::SERVER, kj::mv(bootstrap));
          kj::Promise<void> done = connection->onDisconnect();
          if (tls != nullptr && revoked.empty()) {
            // Closed when a revocation takes this credential away.
            auto closing = kj::newPromiseAndFulfiller<void>();
            const std::uint64_t id = revoker->next++;
            revoker->live.emplace(id, Revoker::Live{peer, from, kj::mv(closing.fulfiller)});
            done = done.exclusiveJoin(kj::mv(closing.promise))
                       .attach(kj::defer([revoker, id] { revoker->live.erase(id); }));
          }
          if (tls != nullptr && timer != nullptr) {
            // Until it is authorized, a connection only costs the server: it
            // gets a few seconds to become useful.
            auto deadline = timer->afterDelay(limits.authorizeWithinMs * kj::MILLISECONDS)
                                .then([gate, closed, limits]() -> kj::Promise<void> {
                                  if (gate->authorized()) return kj::NEVER_DONE;
                                  closed(fmt::format("not authorized for the VM within {} ms",
                                                     limits.authorizeWithinMs));
                                  return kj::READY_NOW;
                                });
            done = done.exclusiveJoin(kj::mv(deadline));
          }
          return done.attach(kj::mv(connection), kj::mv(gate));
        })
        .catch_([from, audit](kj::Exception&& e) -> kj::Promise<void> {
          const std::string why = describe(e);
          if (audit != nullptr)
            audit->recordLimited("connect " + hostOf(from),
                                 {.action = "connect", .result = "refused", .reason = why, .from = from});
          rpcFail(fmt::format("{}: {}", from, why));
        });
  };
  auto state = kj::heap<std::function<kj::Promise<void>()>>();
  auto* again = state.get();
  *again = [&listener, serveOne, again, taskSet = tasks.get()]() -> kj::Promise<void> {
    return listener.acceptAuthenticated().then([serveOne, again, taskSet](kj::AuthenticatedStream accepted) {
      taskSet->add(serveOne(kj::mv(accepted)));
      return (*again)();
    });
  };
  kj::Promise<void> accepting = (*again)().attach(kj::mv(state), kj::mv(tasks));
  if (revoker == nullptr || timer == nullptr) return accepting;
  // Revocations take effect while the server runs, within this interval.
  auto watch = kj::heap<std::function<kj::Promise<void>()>>();
  auto* check = watch.get();
  *check = [timer, revoker, check, revocationCheckMs]() -> kj::Promise<void> {
    return timer->afterDelay(revocationCheckMs * kj::MILLISECONDS).then([revoker, check] {
      revoker->refresh();
      return (*check)();
    });
  };
  return accepting.exclusiveJoin((*check)().attach(kj::mv(watch)));
}

}  // namespace vmsync
