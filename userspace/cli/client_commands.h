// The commands that ask the server about a VM or tell it what to do:
// `vmsync status`, `vmsync switch` and `vmsync stop`.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace vmsync {

/// How `vmsync status`, `switch` and `stop` reach the server.
struct ClientOptions {
  std::string server = "127.0.0.1:7400";
  std::string vm;  // NAME or USER/NAME; empty: the default VM (status: every VM of the user)
  std::string credential;
  bool insecure = false;
};

/// Prints `j` as a command's answer on stdout (what --json gives); returns 0.
int printJson(const nlohmann::json& j);

/// `vmsync status`: the user's VMs, one line each; with a VM, its devices.
/// Returns the exit code.
int runStatus(const ClientOptions& options, bool json);

/// `vmsync switch --to TARGET [--force]`: prints the switch report.
int runSwitch(const ClientOptions& options, const std::string& target, bool force, bool json);

/// `vmsync stop`: parks the VM and prints where.
int runStop(const ClientOptions& options, bool json);

}  // namespace vmsync
