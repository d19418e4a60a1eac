// vmsync-server: the sync server on its own (the same as `vmsync server`).
#include <CLI/CLI.hpp>

#include "server_main.h"

int main(int argc, char** argv) {
  CLI::App app{"vmsync sync server"};
  vmsync::ServerOptions options;
  vmsync::addServerOptions(app, options);
  CLI11_PARSE(app, argc, argv);
  return vmsync::runServer(options);
}
