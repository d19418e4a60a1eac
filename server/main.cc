// vmsync-server: the sync server on its own (the same as `vmsync server`).
#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "server_main.h"

int main(int argc, char** argv) {
  CLI::App app{"vmsync sync server"};
  vmsync::ServerOptions options;
  vmsync::addServerOptions(app, options);
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("vmsync"));
  return vmsync::runServer(options);
}
