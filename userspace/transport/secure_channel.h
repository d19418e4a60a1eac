// Who may talk to the sync server: TLS for every RPC connection, with the
// server's identity and device credentials issued by `vmsync init` and
// `vmsync enroll`; plain TCP only when asked for with --insecure.
#pragma once

#include <capnp/capability.h>
#include <kj/async-io.h>
#include <kj/compat/tls.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "base/audit_log.h"
#include "transport/message_gate.h"
#include "transport/rpc_util.h"

namespace vmsync {

/// The other end of a server connection, as its certificate names it.
struct PeerIdentity {
  bool authenticated = false;  // false on an --insecure server
  std::string user;
  std::string device;
  /// The number of its enrollment ("" for a credential from before numbers).
  std::string credential;
  /// "device phone of user alice", or "an unauthenticated client".
  std::string describe() const;
};

/// A device's credential: who it is, its key and certificate, and the
/// authority and server name it trusts.
struct DeviceCredential {
  std::string path;  // the file it was read from ("" when made in memory)
  std::string user;
  std::string device;
  std::string serverName;
  std::string caPem;
  std::string certificatePem;
  std::string keyPem;
};

/// Reads a credential written by enrollDevice(). Throws Error naming the file,
/// what is wrong with it and what to do: unreadable, a key that is not its
/// certificate's, a certificate its authority did not issue or that expired.
/// Warns when others may read the file.
DeviceCredential loadCredential(const std::string& path);

/// Throw Error naming `where` unless `pem` holds a certificate (a private key).
void checkCertificatePem(const std::string& pem, const std::string& where);
void checkKeyPem(const std::string& pem, const std::string& where);

/// Checks a user or device name: 1 to 64 of [A-Za-z0-9._-]. Throws Error.
void checkName(const std::string& what, const std::string& name);

/// `vmsync init`: creates in `dir` a certificate authority (ca.pem, ca.key)
/// and the server's key and certificate for `serverName` (server.pem,
/// server.key). Refuses to overwrite an existing identity.
void initServerIdentity(const std::string& dir, const std::string& serverName);

/// `vmsync enroll`: issues the credential of `user`'s `device`, valid for
/// `days`, signed by the authority in `dir`; records it there (see
/// revocation.h) and writes it to `out` (mode 0600).
void enrollDevice(const std::string& dir, const std::string& user, const std::string& device, const std::string& out,
                  int days = 3650);

/// How a device or the command line reaches the server.
class ClientTransport {
 public:
  /// Plain TCP (--insecure).
  ClientTransport();
  /// TLS: the server must present a certificate for the credential's server
  /// name from its authority; this side presents the device certificate.
  explicit ClientTransport(const DeviceCredential& credential);
  ~ClientTransport();
  ClientTransport(ClientTransport&&) noexcept;
  ClientTransport& operator=(ClientTransport&&) noexcept;

  bool secure() const;
  /// Connects; a TLS handshake that fails because this is not the server the
  /// credential was enrolled for fails saying so and what to do.
  kj::Promise<kj::Own<RpcConnection>> connect(kj::AsyncIoContext& io, const std::string& address);
  /// The text for a failure of a call on a connection from connect(): when
  /// the server refused the credential (a TLS alert after the handshake),
  /// which credential and what to do; otherwise describe(e).
  std::string explain(const kj::Exception& e) const;

 private:
  struct Tls;
  std::unique_ptr<Tls> tls_;
};

/// The client transport the options ask for: exactly one of a credential file
/// or `insecure`. Throws Error saying what to give otherwise.
ClientTransport clientTransport(const std::string& credentialPath, bool insecure);

/// How the server accepts connections.
class ServerTransport {
 public:
  /// Plain TCP (--insecure): every peer is unauthenticated.
  ServerTransport();
  /// TLS with the identity in `dir` (from `vmsync init`); every client must
  /// present a device certificate from the same authority.
  ServerTransport(const std::string& dir, kj::Timer& timer);
  ~ServerTransport();
  ServerTransport(ServerTransport&&) noexcept;
  ServerTransport& operator=(ServerTransport&&) noexcept;

  bool secure() const;
  /// The limits every connection gets (see MessageLimits).
  void setLimits(const MessageLimits& limits) { limits_ = limits; }
  /// Where refused handshakes, connections closed for a limit or a
  /// revocation, and enrollments and revocations are recorded.
  void setAuditLog(AuditLog* audit);
  /// Called when a revocation takes effect for a device that is on record or
  /// connected (so the server can fence it if it holds the lease).
  using OnRevoked = std::function<void(const std::string& user, const std::string& device, const std::string& why)>;
  void setOnRevoked(OnRevoked onRevoked);

  /// What the server serves on one connection: for `peer`, whose messages
  /// `gate` measures; the server calls gate->authorize() once the peer may
  /// use the VM (an --insecure server's connections start authorized).
  using BootstrapFor =
      std::function<capnp::Capability::Client(const PeerIdentity& peer, std::shared_ptr<ConnectionGate> gate)>;
  /// Accepts connections on `listener` forever. A TLS connection not
  /// authorized within the limits' time is closed. Every
  /// `revocationCheckMs`, and before it serves a new connection, a TLS
  /// server rereads the identity's enrollment and revocation records if they
  /// changed: it records what is new, closes the connections of revoked
  /// credentials and calls OnRevoked.
  kj::Promise<void> serve(kj::ConnectionReceiver& listener, BootstrapFor bootstrapFor,
                          std::uint64_t revocationCheckMs = 250);

 private:
  struct Tls;
  struct Revoker;
  std::unique_ptr<Tls> tls_;
  std::shared_ptr<Revoker> revoker_;
  MessageLimits limits_;
  AuditLog* audit_ = nullptr;
  kj::Timer* timer_ = nullptr;
  std::shared_ptr<InFlightByUser> inFlight_ = std::make_shared<InFlightByUser>();
  std::shared_ptr<ServerBudget> budget_;  // made by serve() from the limits
};

}  // namespace vmsync
