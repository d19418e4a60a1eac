// Identities and credentials: the server's certificate authority and key
// (`vmsync init`), device credentials (`vmsync enroll`), and reading them back
// with errors that say what to do.
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

}  // namespace

void checkCertificatePem(const std::string& pem, const std::string& where) { readCert(pem, where); }
void checkKeyPem(const std::string& pem, const std::string& where) { readKey(pem, where); }

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

}  // namespace vmsync
