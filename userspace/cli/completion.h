// Shell completion: `vmsync completion bash` prints a bash script made from
// the command's own definition, so it never lags behind an option added.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace vmsync {

/// A bash script that defines and registers `_vmsync`: subcommands, their
/// options, the values of options with a fixed set (--accel auto|kvm|tcg),
/// and file names for the other options that take a value.
std::string bashCompletion(const CLI::App& app);

}  // namespace vmsync
