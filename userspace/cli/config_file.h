// The config file: what is otherwise repeated on every command line.
//
//   # /etc/vmsync/vmsync.toml (or --config FILE, or $VMSYNC_CONFIG)
//   server = "sync.example.net:7400"      # every command that talks to a server
//   credential = "/etc/vmsync/phone.cred"
//   device = "phone"
//   [server]                              # only `vmsync server`
//   listen = "0.0.0.0:7400"
//   data = "/var/lib/vmsync/server"
//
// A key at the top applies to every command that has an option of that name
// (--server, --credential, ...), except init, enroll and revoke, which name
// the user and device they act on; a [COMMAND] section (or [bench.switch])
// applies to that command alone and wins over the top. The command line
// wins over both. A key that no command knows is an error naming it.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace vmsync {

/// Where the config file is looked for when --config is not given:
/// $VMSYNC_CONFIG, else /etc/vmsync/vmsync.toml (read only if it exists).
std::string defaultConfigPath();

/// Adds `--config FILE` to `app` (call after every subcommand and option is
/// added, before parsing) with the rules above.
void addConfigFile(CLI::App& app);

}  // namespace vmsync
