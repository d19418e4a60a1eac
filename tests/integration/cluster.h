// A sync server and devices as separate processes, for end-to-end tests: on
// loopback, or each in its own network namespace behind an emulated mobile link.
#pragma once

#include <nlohmann/json.hpp>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lab/network_lab.h"
#include "test_env.h"

namespace vmsync::testing {

/// Counter values printed by the guest's `counter` workload ("vmsync-counter N")
/// in `text`, in order; a line cut at either end of `text` is ignored.
std::vector<long> counterValues(const std::string& text);

/// True when `values` go up by exactly one each step; `why` says where not.
bool consecutive(const std::vector<long>& values, std::string* why);

/// Empty when the host can put the server and devices in network namespaces, else why not.
std::string missingForNetworkLab();

class Cluster {
 public:
  explicit Cluster(const std::string& dir);
  ~Cluster();

  /// From now on the server and each device run in a namespace of their own
  /// (call before startServer); `seed` fixes the links' loss, outages and
  /// jitter draws. Throws vmsync::Error when namespaces cannot be made.
  void useNetworkLab(std::uint64_t seed = 1);
  /// Links `device` to the server with link profile `profile` (wifi, lte, 3g);
  /// a device started without one gets wifi. Needs useNetworkLab().
  void setLink(const std::string& device, const std::string& profile);
  /// Takes `device`'s link down (an outage) or brings it back up.
  void setLinkUp(const std::string& device, bool up);
  /// Gives `device`'s link another profile; its connections stay open.
  void setProfile(const std::string& device, const std::string& profile);
  /// Gives `device`'s end of its link a new address (NetworkLab::renumber):
  /// its connections die, and it must come back from the new address.
  std::string renumber(const std::string& device);
  /// The network lab (nullptr before useNetworkLab()).
  NetworkLab* networkLab() { return lab_.get(); }

  /// The server's address as the test's own commands reach it.
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  /// The server's address as `device` reaches it.
  std::string addressFor(const std::string& device);
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

  /// True when the server answers `vmsync status` (a listing of the user's VMs).
  bool answers();
  /// `vmsync status --json` of VM "vm", or nullopt when the command fails
  /// (no server, or no such VM yet).
  std::optional<nlohmann::json> status();
  /// The device's entry in the status, or null (server unreachable, device unknown).
  nlohmann::json deviceStatus(const std::string& device);
  /// Waits until the head is at least `sequence` and every online device other
  /// than the active one has applied it (offline devices are not waited for).
  bool waitForHead(std::uint64_t sequence, std::chrono::seconds timeout);
  std::uint64_t head();
  /// Waits until `device` is connected (a restarted one has registered again)
  /// and has applied at least `sequence`.
  bool waitForDevice(const std::string& device, std::uint64_t sequence, std::chrono::seconds timeout);

  /// `vmsync switch --to target --json`: exit status, and the report (with what
  /// the command printed on stderr as "progress") or the error text.
  int switchTo(const std::string& target, nlohmann::json* report, std::string* output, bool force = false);

  /// Log of a process, for failure messages.
  std::string logOf(const std::string& device) const;

  /// Switches the VM from `from` to `to` and checks, as test assertions, that
  /// the guest counts on there (three more values) from where it stopped on
  /// `from`. `fromSerial` gets `from`'s serial log as it was at the switch.
  /// Call it in ASSERT_NO_FATAL_FAILURE.
  void switchAndWatchTheCounter(const std::string& from, const std::string& to,
                                std::string* fromSerial);

 private:
  /// `argv` as run for `device` ("" for the server and the test's commands).
  std::vector<std::string> placed(const std::string& device, std::vector<std::string> argv);

  std::string dir_;
  int port_;
  std::unique_ptr<NetworkLab> lab_;
  std::unique_ptr<Process> server_;
  std::map<std::string, std::unique_ptr<Process>> devices_;
};

}  // namespace vmsync::testing
