// vmsync-server: the sync server on its own (the same as `vmsync server`,
// which also reads the settings file). Exit codes as vmsync's: 0 stopped,
// 1 failed, 2 a wrong command line.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdlib>

#include "base/version.h"
#include "server_main.h"

int main(int argc, char** argv) {
  CLI::App app{"vmsync sync server"};
  app.set_version_flag("--version",
                       fmt::format("vmsync-server {} (commit {})", vmsync::buildVersion(), vmsync::buildCommit()));
  vmsync::ServerOptions options;
  vmsync::addServerOptions(app, options);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  const char* noColor = std::getenv("NO_COLOR");
  spdlog::set_default_logger(spdlog::stderr_color_mt(
      "vmsync", noColor != nullptr && *noColor != '\0' ? spdlog::color_mode::never : spdlog::color_mode::automatic));
  return vmsync::runServer(options);
}
