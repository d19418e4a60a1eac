#include "transport/secure_channel.h"

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "base/durable_file.h"
#include "base/error.h"
#include "transport/revocation.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

// ---- certificates -----------------------------------------------------------

[[noreturn]] void sslFail(const std::string& what) {
  unsigned long code = ERR_get_error();
  char text[256] = "unknown OpenSSL error";
  if (code != 0) ERR_error_string_n(code, text, sizeof text);
  ERR_clear_error();
  fail("{}: {}", what, text);
}

struct KeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct CertFree {
  void operator()(X509* x) const { X509_free(x); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using Key = std::unique_ptr<EVP_PKEY, KeyFree>;
using Cert = std::unique_ptr<X509, CertFree>;
using Bio = std::unique_ptr<BIO, BioFree>;

Key newKey() {
  Key key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (!key) sslFail("cannot generate an EC P-256 key");
  return key;
}

enum class Role { authority, server, client };

void addExtension(X509* cert, X509V3_CTX& ctx, int nid, const std::string& value) {
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
  if (ext == nullptr) sslFail(fmt::format("cannot make certificate extension '{}'", value));
  int ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (!ok) sslFail("cannot add a certificate extension");
}

/// A certificate for `subjectKey` named `commonName`, signed by `issuerKey`
/// (`issuer` null: self-signed).
Cert makeCertificate(EVP_PKEY* subjectKey, const std::string& commonName, X509* issuer, EVP_PKEY* issuerKey, Role role,
                     long days, const std::string& serverName = {}) {
  Cert cert(X509_new());
  if (!cert) sslFail("cannot allocate a certificate");
  X509_set_version(cert.get(), 2);
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) sslFail("cannot draw a certificate serial number");
  serial[0] &= 0x7f;  // positive
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  if (bn == nullptr || BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get())) == nullptr)
    sslFail("cannot set a certificate serial number");
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), days * 86400L);
  if (X509_set_pubkey(cert.get(), subjectKey) != 1) sslFail("cannot set a certificate's key");
  X509_NAME* name = X509_get_subject_name(cert.get());
  if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(commonName.c_str()),
                                 -1, -1, 0) != 1)
    sslFail("cannot set a certificate's name");
  X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer ? issuer : cert.get(), cert.get(), nullptr, nullptr, 0);
  switch (role) {
    case Role::authority:
      addExtension(cert.get(), ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
      addExtension(cert.get(), ctx, NID_key_usage, "critical,keyCertSign,cRLSign");
      addExtension(cert.get(), ctx, NID_subject_key_identifier, "hash");
      break;
    case Role::server:
      addExtension(cert.get(), ctx, NID_basic_constraints, "critical,CA:FALSE");
      addExtension(cert.get(), ctx, NID_key_usage, "critical,digitalSignature");
      addExtension(cert.get(), ctx, NID_ext_key_usage, "serverAuth");
      addExtension(cert.get(), ctx, NID_subject_alt_name, "DNS:" + serverName);
      break;
    case Role::client:
      addExtension(cert.get(), ctx, NID_basic_constraints, "critical,CA:FALSE");
      addExtension(cert.get(), ctx, NID_key_usage, "critical,digitalSignature");
      addExtension(cert.get(), ctx, NID_ext_key_usage, "clientAuth");
      break;
  }
  if (X509_sign(cert.get(), issuerKey, EVP_sha256()) == 0) sslFail("cannot sign a certificate");
  return cert;
}

std::string bioText(BIO* bio) {
  char* data = nullptr;
  long size = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<std::size_t>(size));
}

std::string certPem(X509* cert) {
  Bio bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) sslFail("cannot encode a certificate");
  return bioText(bio.get());
}

std::string keyPem(EVP_PKEY* key) {
  Bio bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1)
    sslFail("cannot encode a key");
  return bioText(bio.get());
}

Cert readCert(const std::string& pem, const std::string& where) {
  Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Cert cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!cert) sslFail(fmt::format("{} holds no readable certificate", where));
  return cert;
}

Key readKey(const std::string& pem, const std::string& where) {
  Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Key key(bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!key) sslFail(fmt::format("{} holds no readable private key", where));
  return key;
}

void writeSecret(const std::string& path, const std::string& text) { writeFileDurably(path, text.data(), text.size()); }

/// The common name of a device certificate: "device@user#number", the number
/// that of its enrollment (certificates from before numbers have none).
std::string deviceName(const std::string& user, const std::string& device, const std::string& number) {
  return device + "@" + user + "#" + number;
}

/// `pem` after checking it holds what `where` should (a clear error here
/// rather than an assertion inside the TLS library).
kj::StringPtr checkedCert(const std::string& pem, const std::string& where) {
  readCert(pem, where);
  return kj::StringPtr(pem.c_str());
}
kj::StringPtr checkedKey(const std::string& pem, const std::string& where) {
  readKey(pem, where);
  return kj::StringPtr(pem.c_str());
}

}  // namespace

std::string PeerIdentity::describe() const {
  return authenticated ? fmt::format("device {} of user {}", device, user) : "an unauthenticated client";
}

void checkName(const std::string& what, const std::string& name) {
  if (name.empty() || name.size() > 64) fail("{} must be 1 to 64 characters, not '{}'", what, name);
  for (char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-')
      fail("{} '{}' may contain only letters, digits, '.', '_' and '-'", what, name);
}

void initServerIdentity(const std::string& dir, const std::string& serverName) {
  checkName("server name", serverName);
  makePrivateDirectory(dir);
  for (const char* name : {"ca.key", "ca.pem", "server.key", "server.pem"})
    if (fs::exists(dir + "/" + name))
      fail("{}/{} exists: {} already holds a server identity (remove it to start over; every device must then be "
           "enrolled again)", dir, name, dir);
  Key caKey = newKey();
  Cert ca = makeCertificate(caKey.get(), "vmsync authority for " + serverName, nullptr, caKey.get(), Role::authority,
                            3650);
  Key serverKey = newKey();
  Cert server = makeCertificate(serverKey.get(), serverName, ca.get(), caKey.get(), Role::server, 3650, serverName);
  writeSecret(dir + "/ca.key", keyPem(caKey.get()));
  writeSecret(dir + "/ca.pem", certPem(ca.get()));
  writeSecret(dir + "/server.key", keyPem(serverKey.get()));
  writeSecret(dir + "/server.pem", certPem(server.get()));
  nlohmann::json info{{"server_name", serverName}};
  writeSecret(dir + "/identity.json", info.dump(2));
}

void enrollDevice(const std::string& dir, const std::string& user, const std::string& device, const std::string& out,
                  int days) {
  checkName("user", user);
  checkName("device", device);
  // The certificate's common name, "device@user#number", may be 64
  // characters; numbers up to 999999 leave 56 for the two names.
  if (user.size() + device.size() > 56)
    fail("device '{}' of user '{}': the two names together may be 56 characters, not {}", device, user,
         user.size() + device.size());
  if (days < 1) fail("--days must be at least 1, not {}", days);
  const std::string caPem = readWholeFile(dir + "/ca.pem", 1 << 20);
  Cert ca = readCert(caPem, dir + "/ca.pem");
  Key caKey = readKey(readWholeFile(dir + "/ca.key", 1 << 20), dir + "/ca.key");
  std::string serverName;
  try {
    serverName = nlohmann::json::parse(readWholeFile(dir + "/identity.json", 1 << 20)).at("server_name");
  } catch (const nlohmann::json::exception& e) {
    fail("{}/identity.json is damaged: {}", dir, e.what());
  }
  // On record first: a credential the server cannot find there stops working
  // once its name is revoked.
  const Enrollment enrollment = recordEnrollment(dir, user, device, days);
  Key key = newKey();
  Cert cert = makeCertificate(key.get(), deviceName(user, device, enrollment.id), ca.get(), caKey.get(), Role::client,
                              days);
  nlohmann::json credential{{"user", user},
                            {"device", device},
                            {"server_name", serverName},
                            {"ca", caPem},
                            {"certificate", certPem(cert.get())},
                            {"key", keyPem(key.get())}};
  writeSecret(out, credential.dump(2));
}

DeviceCredential loadCredential(const std::string& path) {
  DeviceCredential c;
  c.path = path;
  try {
    auto j = nlohmann::json::parse(readWholeFile(path, 1 << 20));
    c.user = j.at("user");
    c.device = j.at("device");
    c.serverName = j.at("server_name");
    c.caPem = j.at("ca");
    c.certificatePem = j.at("certificate");
    c.keyPem = j.at("key");
  } catch (const nlohmann::json::exception& e) {
    fail("credential {} is not one `vmsync enroll` wrote: {}", path, e.what());
  }
  if (std::string warning = readableByOthers(path, "a device key"); !warning.empty()) spdlog::warn("{}", warning);
  // Fail here, naming the file and what to do, rather than in the middle of a
  // handshake with an OpenSSL error.
  Cert ca = readCert(c.caPem, path);
  Cert cert = readCert(c.certificatePem, path);
  Key key = readKey(c.keyPem, path);
  const std::string again = fmt::format("ask for a new one (`vmsync enroll --user {} --device {}` on the server's "
                                        "identity)", c.user, c.device);
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    fail("{}: its key does not belong to its certificate; {}", path, again);
  }
  EVP_PKEY* authority = X509_get0_pubkey(ca.get());
  if (authority == nullptr || X509_verify(cert.get(), authority) != 1) {
    ERR_clear_error();
    fail("{}: its certificate was not issued by the authority it trusts; {}", path, again);
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) <= 0)
    fail("{}: its certificate expired; {}", path, again);
  return c;
}

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
          auto gate = std::make_shared<ConnectionGate>(limits, peer.user, inFlight, closed);
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
