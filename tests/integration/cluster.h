// A sync server and devices as separate processes on loopback, for end-to-end tests.
#pragma once

#include <nlohmann/json.hpp>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "test_env.h"

namespace vmsync::testing {

/// Counter values printed by the guest's `counter` workload ("vmsync-counter N")
/// in `text`, in order; a line cut at either end of `text` is ignored.
std::vector<long> counterValues(const std::string& text);

/// True when `values` go up by exactly one each step; `why` says where not.
bool consecutive(const std::vector<long>& values, std::string* why);

class Cluster {
 public:
  explicit Cluster(const std::string& dir);
  ~Cluster();

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string stateDir(const std::string& device) const { return dir_ + "/" + device; }
  std::string serialLog(const std::string& device) const { return stateDir(device) + "/serial.log"; }
  /// The server identity (`vmsync init`) the cluster's server uses.
  std::string identityDir() const { return dir_ + "/identity"; }
  /// Credential file of `user`'s `device`, enrolled on first use. The test
  /// cluster's devices and commands act for user "owner".
  std::string credential(const std::string& device, const std::string& user = "owner");

  /// Starts `vmsync server` with `extra` options (restarts it when running).
  void startServer(const std::vector<std::string>& extra = {});
  /// Starts `vmsync active` (TCG and a 1 s interval unless `extra` says otherwise).
  void startActive(const std::string& device, const std::vector<std::string>& extra = {});
  void startStandby(const std::string& device, const std::vector<std::string>& extra = {});
  Process& device(const std::string& name) { return *devices_.at(name); }
  Process& server() { return *server_; }
  void stopDevice(const std::string& name) { devices_.erase(name); }

  /// `vmsync status --json`, or nullopt when the command fails.
  std::optional<nlohmann::json> status();
  /// Waits until the head is at least `sequence` and every online device other
  /// than the active one has applied it.
  bool waitForHead(std::uint64_t sequence, std::chrono::seconds timeout);
  std::uint64_t head();

  /// `vmsync switch --to target --json`: exit status, and the report (with what
  /// the command printed on stderr as "progress") or the error text.
  int switchTo(const std::string& target, nlohmann::json* report, std::string* output);

  /// Log of a process, for failure messages.
  std::string logOf(const std::string& device) const;

 private:
  std::string dir_;
  int port_;
  std::unique_ptr<Process> server_;
  std::map<std::string, std::unique_ptr<Process>> devices_;
};

}  // namespace vmsync::testing
