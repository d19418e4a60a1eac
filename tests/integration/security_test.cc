// Only a VM's user's devices get in: a real server process with TLS, clients
// with enrolled, foreign, revoked or missing credentials, another user's
// devices, and connections that would make the server hold large messages
// before they are authorized. (Bad checkpoints: security_vm_test.cc.)
#include <gtest/gtest.h>

#include <lz4.h>

#include <atomic>
#include <cstring>
#include <regex>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <thread>

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <nlohmann/json.hpp>

#include "base/units.h"
#include "security_support.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

TEST(Security, MissingOrForeignCredentialsAreRefused) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  ASSERT_EQ(statusWith(cluster, {"--credential", cluster.credential("cli")}), "") << cluster.logOf("server");

  // Plain TCP to a TLS server.
  std::string plain = statusWith(cluster, {"--insecure"});
  EXPECT_NE(plain.find("closed the connection"), std::string::npos) << plain;
  // A credential issued by another authority (another `vmsync init`).
  std::string out;
  ASSERT_EQ(run({vmsyncBinary(), "init", "--dir", dir.path() + "/foreign"}, &out), 0) << out;
  ASSERT_EQ(run({vmsyncBinary(), "enroll", "--dir", dir.path() + "/foreign", "--user", "owner", "--device", "phone",
                 "--out", dir.path() + "/foreign.cred"},
                &out),
            0)
      << out;
  std::string foreign = statusWith(cluster, {"--credential", dir.path() + "/foreign.cred"});
  EXPECT_NE(foreign.find("not trusted"), std::string::npos) << foreign;
  // No choice at all is an error that says what to give.
  std::string none = statusWith(cluster, {});
  EXPECT_NE(none.find("give --credential FILE"), std::string::npos) << none;
  const std::string log = readFile(dir.path() + "/server.log");
  EXPECT_NE(log.find("connection refused"), std::string::npos) << log;
  std::printf("plain TCP: %sforeign authority: %s", plain.c_str(), foreign.c_str());

  // A server needs one of --tls and --insecure too.
  ASSERT_NE(run({vmsyncBinary(), "server", "--listen", "127.0.0.1:1", "--data", dir.path() + "/other"}, &out), 0);
  EXPECT_NE(out.find("give --tls DIR"), std::string::npos) << out;
}

/// Writes a credential made of `base`'s fields with `fields` taken from
/// `donor` instead; returns its path.
std::string mixedCredential(const std::string& base, const std::string& donor, const std::vector<std::string>& fields,
                            const std::string& out) {
  auto credential = nlohmann::json::parse(readFile(base));
  const auto other = nlohmann::json::parse(readFile(donor));
  for (const auto& field : fields) credential[field] = other.at(field);
  std::ofstream(out) << credential.dump(2);
  fs::permissions(out, fs::perms::owner_read | fs::perms::owner_write);
  return out;
}

TEST(Security, BadCredentialsAreNamedWithWhatToDo) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  const std::string good = cluster.credential("phone");
  std::string out;
  ASSERT_EQ(run({vmsyncBinary(), "init", "--dir", dir.path() + "/foreign"}, &out), 0) << out;
  ASSERT_EQ(run({vmsyncBinary(), "enroll", "--dir", dir.path() + "/foreign", "--user", "owner", "--device", "phone",
                 "--out", dir.path() + "/foreign.cred"},
                &out),
            0)
      << out;
  const std::string foreign = dir.path() + "/foreign.cred";

  // Enrolled on another server's identity: this server is not the one it trusts.
  const std::string other = statusWith(cluster, {"--credential", foreign});
  EXPECT_NE(other.find(foreign), std::string::npos) << other;
  EXPECT_NE(other.find("enrolled on another server's identity"), std::string::npos) << other;
  // This server's authority, but a certificate another authority signed: the
  // server refuses it.
  const std::string grafted =
      mixedCredential(good, foreign, {"certificate", "key"}, dir.path() + "/grafted.cred");
  const std::string refused = statusWith(cluster, {"--credential", grafted});
  EXPECT_NE(refused.find(grafted + ": its certificate was not issued by the authority it trusts"), std::string::npos)
      << refused;
  EXPECT_NE(refused.find("vmsync enroll --user owner --device phone"), std::string::npos) << refused;
  // A key that belongs to another certificate.
  const std::string swapped =
      mixedCredential(good, cluster.credential("laptop"), {"key"}, dir.path() + "/swapped.cred");
  const std::string mismatch = statusWith(cluster, {"--credential", swapped});
  EXPECT_NE(mismatch.find(swapped + ": its key does not belong to its certificate"), std::string::npos) << mismatch;
  EXPECT_NE(mismatch.find("vmsync enroll"), std::string::npos) << mismatch;
  std::printf("other server: %sother authority: %sswapped key: %s", other.c_str(), refused.c_str(), mismatch.c_str());
  // The server saw only the handshake enrolled elsewhere fail (the other two
  // never left the device): one audit line, with no user or device to name.
  const auto lines = auditOf(dir.path() + "/server");
  EXPECT_EQ(audited(lines, "connect", "refused", "", ""), 1u);

  // A credential others can read works, with a warning that says how to fix it.
  fs::permissions(good, fs::perms::group_read | fs::perms::others_read, fs::perm_options::add);
  std::string errors;
  ASSERT_EQ(run({vmsyncBinary(), "status", "--server", cluster.address(), "--credential", good}, &out, &errors), 0)
      << errors;
  EXPECT_NE(errors.find(good + " holds a device key and is mode 0644"), std::string::npos) << errors;
  EXPECT_NE(errors.find("chmod 600 " + good), std::string::npos) << errors;
}

TEST(Security, KeysChainsAndGuestDataAreForTheirOwnerAlone) {
  TempDir dir;
  Cluster cluster(dir.path());
  // Directories a careless user made readable by everyone beforehand.
  for (const auto& made : {dir.path() + "/server", cluster.stateDir("B")}) {
    fs::create_directories(made);
    fs::permissions(made, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec);
    ASSERT_EQ(modeOf(made), 0755u);
  }
  cluster.startServer();
  cluster.startStandby("B");
  ASSERT_TRUE(waitFor([&] { return cluster.logOf("B").find("registered with") != std::string::npos; },
                      std::chrono::seconds(30)))
      << cluster.logOf("B");

  EXPECT_EQ(modeOf(cluster.identityDir()), 0700u);
  for (const char* file : {"ca.key", "ca.pem", "server.key", "server.pem"})
    EXPECT_EQ(modeOf(cluster.identityDir() + "/" + file), 0600u) << file;
  EXPECT_EQ(modeOf(cluster.credential("B")), 0600u);
  EXPECT_EQ(modeOf(dir.path() + "/server"), 0700u);
  EXPECT_EQ(modeOf(dir.path() + "/server/vms/owner/vm/checkpoints"), 0700u);
  EXPECT_EQ(modeOf(dir.path() + "/server/audit.jsonl"), 0600u);
  EXPECT_EQ(modeOf(cluster.stateDir("B")), 0700u);
  // Each was told about: the mode is fixed, not silently.
  EXPECT_NE(cluster.logOf("server").find(dir.path() + "/server was mode 0755"), std::string::npos)
      << cluster.logOf("server");
  EXPECT_NE(cluster.logOf("B").find(cluster.stateDir("B") + " was mode 0755"), std::string::npos) << cluster.logOf("B");
}


TEST(Security, ARevokedDeviceIsRefusedAndItsOpenConnectionClosed) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  const std::string phoneCredential = cluster.credential("phone");
  const std::string laptopCredential = cluster.credential("laptop");
  auto io = kj::setupAsyncIo();
  Client phone(io, cluster, phoneCredential);
  ASSERT_EQ(phone.registerAs("phone"), "");
  ASSERT_FALSE(phone.closedWithin(std::chrono::milliseconds(300)));  // open before the revocation

  std::string out;
  ASSERT_EQ(revoke(cluster, {"--user", "owner", "--device", "phone", "--reason", "lost on a train"}, &out), 0) << out;
  EXPECT_NE(out.find("revoked device phone of user owner: 1 credential(s)"), std::string::npos) << out;
  const auto revokedAt = std::chrono::steady_clock::now();
  // The open session goes (the server checks every 250 ms)...
  ASSERT_TRUE(phone.closedWithin(std::chrono::seconds(10))) << cluster.logOf("server");
  std::printf("the revoked device's connection closed %.0f ms after `vmsync revoke`\n",
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - revokedAt).count());
  // ...its next connection is refused, saying why...
  const std::string refused = statusWith(cluster, {"--credential", phoneCredential});
  EXPECT_TRUE(std::regex_search(
      refused, std::regex("vmsync: device phone of user owner may not connect: its credential #[0-9]+ was revoked at "
                          "[0-9-]+T[0-9:]+Z")))
      << refused;
  EXPECT_NE(refused.find("(lost on a train)"), std::string::npos) << refused;
  Client again(io, cluster, phoneCredential);
  EXPECT_NE(again.registerAs("phone").find("may not connect"), std::string::npos);
  // ...and the owner's other device goes on.
  EXPECT_EQ(statusWith(cluster, {"--credential", laptopCredential}), "");

  // A replacement enrolled under the same name gets in.
  const std::string replacement = dir.path() + "/new-phone.cred";
  ASSERT_EQ(run({vmsyncBinary(), "enroll", "--dir", cluster.identityDir(), "--user", "owner", "--device", "phone",
                 "--out", replacement},
                &out),
            0)
      << out;
  EXPECT_EQ(statusWith(cluster, {"--credential", replacement}), "");
  EXPECT_NE(statusWith(cluster, {"--credential", phoneCredential}).find("was revoked"), std::string::npos);

  // Every device of a user at once.
  const std::string mallory = cluster.credential("tablet", "mallory");
  ASSERT_EQ(revoke(cluster, {"--user", "mallory"}, &out), 0) << out;
  EXPECT_NE(statusWith(cluster, {"--credential", mallory}).find("device tablet of user mallory may not connect"),
            std::string::npos);

  const auto lines = auditOf(dir.path() + "/server");
  EXPECT_EQ(audited(lines, "revoke", "done", "owner", "phone", "lost on a train"), 1u);
  EXPECT_EQ(audited(lines, "revoke", "done", "mallory", ""), 1u);
  EXPECT_EQ(audited(lines, "connect", "closed", "owner", "phone", "was revoked"), 1u);
  EXPECT_GE(audited(lines, "connect", "refused", "owner", "phone", "was revoked"), 1u);
  // Enrollments since the server started: the two phones, the laptop, the tablet.
  EXPECT_EQ(audited(lines, "enroll", "done", "owner", "phone"), 2u);
  EXPECT_EQ(audited(lines, "enroll", "done", "owner", "laptop"), 1u);
  EXPECT_EQ(audited(lines, "enroll", "done", "mallory", "tablet"), 1u);
}

TEST(Security, RevokeAndEnrollSayWhatIsWrong) {
  TempDir dir;
  std::string out;
  EXPECT_NE(run({vmsyncBinary(), "revoke", "--dir", dir.path() + "/nothing", "--user", "owner"}, &out), 0);
  EXPECT_NE(out.find("holds no server identity"), std::string::npos) << out;
  ASSERT_EQ(run({vmsyncBinary(), "init", "--dir", dir.path() + "/id"}, &out), 0) << out;
  const std::string longName(40, 'd');
  EXPECT_NE(run({vmsyncBinary(), "enroll", "--dir", dir.path() + "/id", "--user", std::string(20, 'u'), "--device",
                 longName, "--out", dir.path() + "/x.cred"},
                &out),
            0);
  EXPECT_NE(out.find("the two names together may be 56 characters, not 60"), std::string::npos) << out;
  EXPECT_NE(run({vmsyncBinary(), "enroll", "--dir", dir.path() + "/id", "--user", "owner", "--device", "phone",
                 "--out", dir.path() + "/x.cred", "--days", "0"},
                &out),
            0);
  EXPECT_NE(out.find("--days"), std::string::npos) << out;
  // A damaged record is named, and nothing is written over it.
  std::ofstream(dir.path() + "/id/enrolled.json") << "{ not json";
  EXPECT_NE(run({vmsyncBinary(), "enroll", "--dir", dir.path() + "/id", "--user", "owner", "--device", "phone",
                 "--out", dir.path() + "/x.cred"},
                &out),
            0);
  EXPECT_NE(out.find(dir.path() + "/id/enrolled.json is damaged"), std::string::npos) << out;
  EXPECT_EQ(readFile(dir.path() + "/id/enrolled.json"), "{ not json");
  EXPECT_FALSE(fs::exists(dir.path() + "/x.cred"));
}

TEST(Security, AnotherUsersDeviceIsRefusedForEveryOperation) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  auto io = kj::setupAsyncIo();
  Client phone(io, cluster, cluster.credential("phone"));
  ASSERT_EQ(phone.registerAs("phone"), "");  // the owner's device creates VM owner/vm

  // Another user names the owner's VM in every request there is.
  Client laptop(io, cluster, cluster.credential("laptop", "mallory"));
  const std::string list = laptop.attempt([](wire::SyncServer::Client server, kj::WaitScope& scope) {
    auto request = server.statusRequest();
    request.setVm("owner/vm");
    request.send().wait(scope);
  });
  const std::string join = laptop.registerAs("laptop", "owner/vm");  // the only way to a session: push, lease, apply
  const std::string move = laptop.attempt([](wire::SyncServer::Client server, kj::WaitScope& scope) {
    auto request = server.switchToRequest();
    request.setTarget("laptop");
    request.setVm("owner/vm");
    request.send().wait(scope);
  });
  const std::string park = laptop.attempt([](wire::SyncServer::Client server, kj::WaitScope& scope) {
    auto request = server.stopRequest();
    request.setVm("owner/vm");
    request.send().wait(scope);
  });
  std::printf("list: %s\nregister: %s\nswitch: %s\nstop: %s\n", list.c_str(), join.c_str(), move.c_str(),
              park.c_str());
  EXPECT_NE(list.find("device laptop of user mallory may not list VM 'owner/vm'"), std::string::npos) << list;
  EXPECT_NE(join.find("device laptop of user mallory may not use VM 'owner/vm'"), std::string::npos) << join;
  EXPECT_NE(move.find("device laptop of user mallory may not switch VM 'owner/vm'"), std::string::npos) << move;
  EXPECT_NE(park.find("device laptop of user mallory may not stop VM 'owner/vm'"), std::string::npos) << park;
  // Not even under another of the owner's device names.
  Client impostor(io, cluster, cluster.credential("laptop", "mallory"));
  const std::string pose = impostor.registerAs("tablet", "owner/vm");
  EXPECT_NE(pose.find("cannot register as device tablet"), std::string::npos) << pose;
  // Her own VM of the same name is another VM, in her own namespace.
  Client own(io, cluster, cluster.credential("laptop", "mallory"));
  ASSERT_EQ(own.registerAs("laptop"), "");
  std::vector<std::string> mine;
  ASSERT_EQ(own.attempt([&mine](wire::SyncServer::Client server, kj::WaitScope& scope) {
    for (auto vm : server.listVmsRequest().send().wait(scope).getVms())
      mine.push_back(std::string(vm.getUser()) + "/" + std::string(vm.getName()));
  }), "");
  EXPECT_EQ(mine, std::vector<std::string>{"mallory/vm"});

  // The owner still sees only its own devices.
  auto status = cluster.status();
  ASSERT_TRUE(status);
  ASSERT_EQ((*status)["devices"].size(), 1u) << status->dump();
  EXPECT_EQ((*status)["devices"][0]["device"], "phone");
  EXPECT_EQ((*status)["user"], "owner");

  // Every refusal is in the audit log, with who asked for what.
  auto audit = auditOf(dir.path() + "/server");
  EXPECT_EQ(audited(audit, "create", "done", "owner", "phone"), 1u);
  EXPECT_EQ(audited(audit, "create", "done", "mallory", "laptop"), 1u);
  EXPECT_EQ(audited(audit, "list", "refused", "mallory", "laptop", "belongs to user owner"), 1u);
  EXPECT_EQ(audited(audit, "use", "refused", "mallory", "laptop", "belongs to user owner"), 1u);
  EXPECT_EQ(audited(audit, "switch", "refused", "mallory", "laptop", "belongs to user owner"), 1u);
  EXPECT_EQ(audited(audit, "stop", "refused", "mallory", "laptop", "belongs to user owner"), 1u);
  EXPECT_EQ(audited(audit, "register", "refused", "mallory", "laptop", "cannot register as device tablet"), 1u);
}

TEST(Security, UnauthorizedConnectionsCannotMakeTheServerHoldLargeMessages) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  auto io = kj::setupAsyncIo();
  Client phone(io, cluster, cluster.credential("phone"));
  ASSERT_EQ(phone.registerAs("phone"), "");  // the owner's device claims the server
  const std::string data = dir.path() + "/server";
  const pid_t server = cluster.server().pid();
  const std::uint64_t idle = residentBytes(server);

  // 20 TLS connections of a user who owns nothing here, each announcing a
  // 1 GiB message and sending its first 32 MiB: the server would hold 640
  // MiB of them if it took them in.
  constexpr int kAttackers = 20;
  constexpr std::size_t kChunk = 1 << 20, kChunks = 32;
  const DeviceCredential mallory = loadCredential(cluster.credential("laptop", "mallory"));
  kj::TlsCertificate ca(kj::StringPtr(mallory.caPem.c_str()));
  kj::TlsKeypair keypair{kj::TlsPrivateKey(kj::StringPtr(mallory.keyPem.c_str())),
                         kj::TlsCertificate(kj::StringPtr(mallory.certificatePem.c_str()))};
  kj::TlsContext::Options options;
  options.useSystemTrustStore = false;
  options.trustedCertificates = kj::arrayPtr(&ca, 1);
  options.defaultKeypair = keypair;
  kj::TlsContext tls(kj::mv(options));
  std::vector<kj::byte> header(8, 0), junk(kChunk, 0x42);
  const std::uint32_t words = (1u << 30) / 8;
  std::memcpy(header.data() + 4, &words, 4);  // one segment (count - 1 = 0) of 1 GiB

  std::atomic<bool> attacking{true};
  std::atomic<std::uint64_t> peak{idle};
  std::atomic<int> answered{0}, unanswered{0};
  std::thread watcher([&] {
    // The owner's status keeps working while the attack runs.
    while (attacking) {
      peak = std::max<std::uint64_t>(peak, residentBytes(server));
      if (statusWith(cluster, {"--credential", cluster.credential("cli")}).empty())
        ++answered;
      else
        ++unanswered;
    }
  });
  std::vector<std::size_t> sent(kAttackers, 0);
  kj::Vector<kj::Promise<void>> attacks;
  auto address = io.provider->getNetwork().parseAddress(cluster.address()).wait(io.waitScope);
  for (int i = 0; i < kAttackers; ++i) {
    auto attack =
        address->connect()
            .then([&](kj::Own<kj::AsyncIoStream> raw) {
              return tls.wrapClient(kj::mv(raw), kj::StringPtr(mallory.serverName.c_str()));
            })
            .then([&, i](kj::Own<kj::AsyncIoStream> stream) {
              auto* s = stream.get();
              kj::Promise<void> chain = s->write(header.data(), header.size());
              for (std::size_t c = 0; c < kChunks; ++c)
                chain = chain.then([&, s, i]() {
                  return s->write(junk.data(), junk.size()).then([&, i]() { sent[i] += kChunk; });
                });
              return chain.attach(kj::mv(stream));
            })
            .catch_([](kj::Exception&&) {});  // the server closed it: what the test wants
    attacks.add(kj::mv(attack));
  }
  kj::joinPromises(attacks.releaseAsArray()).wait(io.waitScope);
  attacking = false;
  watcher.join();

  const std::uint64_t grown = peak > idle ? peak - idle : 0;
  std::printf("server RSS: %.1f MiB idle, %.1f MiB more at the peak; status answered %d times, failed %d\n",
              idle / 1048576.0, grown / 1048576.0, answered.load(), unanswered.load());
  for (int i = 0; i < kAttackers; ++i)
    EXPECT_LT(sent[i], kChunk * kChunks) << "attacker " << i << " sent all its bytes: the server took them in";
  EXPECT_LT(grown, 200u << 20);
  EXPECT_GT(answered.load(), 0);
  EXPECT_EQ(unanswered.load(), 0);
  auto audit = auditOf(data);
  EXPECT_EQ(audited(audit, "connect", "closed", "mallory", "laptop", "before the connection was authorized"),
            static_cast<std::size_t>(kAttackers));
  const std::string log = cluster.logOf("server");
  EXPECT_NE(log.find("a message of 1024.0 MiB before the connection was authorized (the limit is 64.0 KiB)"),
            std::string::npos)
      << log;
}

TEST(Security, AConnectionNotAuthorizedWithinSecondsIsClosed) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  auto io = kj::setupAsyncIo();
  Client phone(io, cluster, cluster.credential("phone"));
  ASSERT_EQ(phone.registerAs("phone"), "");
  // A refused request does not authorize: the connection idles, and ends.
  auto connection = ClientTransport(loadCredential(cluster.credential("laptop", "mallory")))
                        .connect(io, cluster.address())
                        .wait(io.waitScope);
  auto server = connection->bootstrap().castAs<wire::SyncServer>();
  auto request = server.statusRequest();
  request.setVm("owner/vm");
  EXPECT_ANY_THROW(request.send().wait(io.waitScope));
  const auto start = std::chrono::steady_clock::now();
  connection->onDisconnect().wait(io.waitScope);
  const double after = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("closed %.1f s after the refusal\n", after);
  auto audit = auditOf(dir.path() + "/server");
  EXPECT_EQ(audited(audit, "connect", "closed", "mallory", "laptop", "not authorized for the VM within 5000 ms"), 1u);
  // The owner's device, authorized, stays connected past that time.
  EXPECT_EQ(phone.lease(), 1u);
}

}  // namespace
}  // namespace vmsync::testing
