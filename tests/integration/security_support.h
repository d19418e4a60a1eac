// What the security tests share: an in-process client of the cluster's
// server, and readers of the server's audit log.
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <kj/async-io.h>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cluster.h"
#include "transport/rpc_util.h"
#include "transport/secure_channel.h"
#include "vmsync.capnp.h"

namespace vmsync::testing {

constexpr std::uint64_t kUnits = 16;  // of the small VM the unit tests push

/// A device peer that takes no part: the tests only talk to the server.
class SilentPeer final : public wire::DevicePeer::Server {
  kj::Promise<void> apply(ApplyContext) override { KJ_FAIL_REQUIRE("test peer applies nothing"); }
  kj::Promise<void> handOff(HandOffContext) override { KJ_FAIL_REQUIRE("test peer does not hand off"); }
  kj::Promise<void> activate(ActivateContext) override { KJ_FAIL_REQUIRE("test peer does not activate"); }
};

/// One in-process client of the cluster's server, acting as `device`.
class Client {
 public:
  Client(kj::AsyncIoContext& io, Cluster& cluster, const std::string& credentialPath)
      : io_(io), transport_(loadCredential(credentialPath)), address_(cluster.address()) {}

  /// Runs `body` against a fresh connection; the error text, or "" on success.
  std::string attempt(const std::function<void(wire::SyncServer::Client, kj::WaitScope&)>& body) {
    try {
      auto connection = transport_.connect(io_, address_).wait(io_.waitScope);
      body(connection->bootstrap().castAs<wire::SyncServer>(), io_.waitScope);
      return {};
    } catch (const kj::Exception& e) {
      return describe(e);
    }
  }

  /// Registers as `device` for VM `vm` and keeps the session for push() and lease().
  std::string registerAs(const std::string& device, const std::string& vm = "") {
    try {
      connection_ = transport_.connect(io_, address_).wait(io_.waitScope);
      auto request = connection_->bootstrap().castAs<wire::SyncServer>().registerRequest();
      request.setDeviceId(device);
      request.setPeer(kj::heap<SilentPeer>());
      request.setAppliedSequence(0);
      request.setVm(vm);
      auto response = request.send().wait(io_.waitScope);
      session_ = response.getSession();
      head_ = response.getHeadSequence();
      return {};
    } catch (const kj::Exception& e) {
      return describe(e);
    }
  }
  std::uint64_t lease() {
    return session_->acquireLeaseRequest().send().wait(io_.waitScope).getEpoch();
  }
  /// Pushes the checkpoint `fill` builds; the error text, or "" when stored.
  std::string push(const std::function<void(wire::Checkpoint::Builder)>& fill) {
    auto request = session_->pushRequest();
    fill(request.initCheckpoint());
    try {
      request.send().wait(io_.waitScope);
      return {};
    } catch (const kj::Exception& e) {
      return describe(e);
    }
  }
  std::uint64_t head() { return head_; }
  /// Whether the server closed the registered session's connection within `limit`.
  bool closedWithin(std::chrono::milliseconds limit) {
    bool closed = false;
    connection_->onDisconnect()
        .then([&closed] { closed = true; }, [&closed](kj::Exception&&) { closed = true; })
        .exclusiveJoin(io_.provider->getTimer().afterDelay(limit.count() * kj::MILLISECONDS))
        .wait(io_.waitScope);
    return closed;
  }

 private:
  kj::AsyncIoContext& io_;
  ClientTransport transport_;
  std::string address_;
  kj::Own<RpcConnection> connection_;
  std::optional<wire::DeviceSession::Client> session_;
  std::uint64_t head_ = 0;
};

/// `vmsync status` with `how`; its output when it fails, "" when it succeeds.
inline std::string statusWith(Cluster& cluster, const std::vector<std::string>& how) {
  std::vector<std::string> argv{vmsyncBinary(), "status", "--server", cluster.address()};
  argv.insert(argv.end(), how.begin(), how.end());
  std::string out;
  int rc = run(argv, &out);
  return rc == 0 ? "" : out;
}

/// The server's audit log, one JSON object per line.
inline std::vector<nlohmann::json> auditOf(const std::string& dataDir) {
  std::vector<nlohmann::json> lines;
  std::istringstream in(readFile(dataDir + "/audit.jsonl"));
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

/// The audit lines with these action, result, user and device whose reason holds `reason`.
inline std::size_t audited(const std::vector<nlohmann::json>& lines, const std::string& action, const std::string& result,
                    const std::string& user, const std::string& device, const std::string& reason = "") {
  std::size_t n = 0;
  for (const auto& line : lines)
    if (line.value("action", "") == action && line.value("result", "") == result && line.value("user", "") == user &&
        line.value("device", "") == device && line.value("reason", "").find(reason) != std::string::npos)
      ++n;
  return n;
}

/// Resident memory of process `pid`, in bytes.
inline std::uint64_t residentBytes(pid_t pid) {
  std::istringstream in(readFile("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  ADD_FAILURE() << "no VmRSS for process " << pid;
  return 0;
}

/// `vmsync revoke` on the cluster's identity with `what`; its exit status.
inline int revoke(Cluster& cluster, const std::vector<std::string>& what, std::string* output) {
  std::vector<std::string> argv{vmsyncBinary(), "revoke", "--dir", cluster.identityDir()};
  argv.insert(argv.end(), what.begin(), what.end());
  return run(argv, output);
}

/// The permission bits of `path`.
inline unsigned modeOf(const std::string& path) {
  return static_cast<unsigned>(std::filesystem::status(path).permissions()) & 0777;
}

}  // namespace vmsync::testing
