// The daemons under systemd (Type=notify, WatchdogSec): this test stands in
// for systemd's side of the protocol: a datagram socket named in
// NOTIFY_SOCKET, and WATCHDOG_USEC in the environment.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <nlohmann/json.hpp>

#include "test_env.h"

namespace vmsync::testing {
namespace {

/// systemd's end: receives what the daemon sends.
class NotifySocket {
 public:
  explicit NotifySocket(std::string path) : path_(std::move(path)) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, path_.c_str(), sizeof(address.sun_path) - 1);
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0)
      ADD_FAILURE() << "cannot bind " << path_ << ": " << std::strerror(errno);
  }
  ~NotifySocket() { ::close(fd_); }
  const std::string& path() const { return path_; }

  /// The next message, or "" after `timeout`.
  std::string next(std::chrono::milliseconds timeout) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1) return "";
    char buffer[4096];
    const ssize_t n = ::recv(fd_, buffer, sizeof(buffer), 0);
    return n > 0 ? std::string(buffer, static_cast<std::size_t>(n)) : "";
  }

  /// Waits for a message that contains `field`; the ones before it are kept in `seen`.
  std::string waitFor(const std::string& field, std::chrono::milliseconds timeout, std::vector<std::string>* seen) {
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      std::string message = next(left);
      if (message.empty()) continue;
      if (message.find(field) != std::string::npos) return message;
      if (seen) seen->push_back(message);
    }
    return "";
  }

 private:
  std::string path_;
  int fd_ = -1;
};

bool canConnect(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool connected = ::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  ::close(fd);
  return connected;
}

TEST(ServiceNotify, TheServerIsReadyWhenItListensPingsItsWatchdogAndSaysWhenItStops) {
  TempDir dir;
  NotifySocket systemd(dir / "notify");
  const int port = freePort();
  // Pings every 150 ms at a WatchdogSec of 0.3 s.
  Process server({"/usr/bin/env", "NOTIFY_SOCKET=" + systemd.path(), "WATCHDOG_USEC=300000", vmsyncBinary(), "server",
                  "--insecure", "--listen", "127.0.0.1:" + std::to_string(port), "--data", dir / "data"},
                 dir / "server.log");

  std::vector<std::string> before;
  const std::string ready = systemd.waitFor("READY=1", std::chrono::seconds(20), &before);
  ASSERT_NE(ready, "") << readFile(dir / "server.log");
  EXPECT_NE(ready.find("STATUS=listening on 127.0.0.1:" + std::to_string(port)), std::string::npos) << ready;
  EXPECT_TRUE(canConnect(port)) << "READY=1 came before the server listened";

  // Five pings within two seconds: a loop that runs pings.
  int pings = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (pings < 5 && std::chrono::steady_clock::now() < end)
    if (systemd.next(std::chrono::milliseconds(500)) == "WATCHDOG=1") ++pings;
  EXPECT_EQ(pings, 5) << "WATCHDOG=1 pings in 2 s at WATCHDOG_USEC=300000";

  ::kill(server.pid(), SIGTERM);
  EXPECT_NE(systemd.waitFor("STOPPING=1", std::chrono::seconds(10), nullptr), "") << readFile(dir / "server.log");
  const int status = server.stop();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
}

TEST(ServiceNotify, ServerWithoutAWatchdogSendsNoPings) {
  TempDir dir;
  NotifySocket systemd(dir / "notify");
  const int port = freePort();
  Process server({"/usr/bin/env", "NOTIFY_SOCKET=" + systemd.path(), vmsyncBinary(), "server", "--insecure", "--listen",
                  "127.0.0.1:" + std::to_string(port), "--data", dir / "data"},
                 dir / "server.log");
  ASSERT_NE(systemd.waitFor("READY=1", std::chrono::seconds(20), nullptr), "") << readFile(dir / "server.log");
  EXPECT_EQ(systemd.next(std::chrono::milliseconds(700)), "") << "a ping without WATCHDOG_USEC";
}

TEST(ServiceNotify, AStandbyIsReadyOnceRegistered) {
  TempDir dir;
  NotifySocket systemd(dir / "notify");
  const std::string address = "127.0.0.1:" + std::to_string(freePort());
  Process server({vmsyncBinary(), "server", "--insecure", "--listen", address, "--data", dir / "data"},
                 dir / "server.log");
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "server.log").find("listening on") != std::string::npos; },
                      std::chrono::seconds(20)));
  Process standby({"/usr/bin/env", "NOTIFY_SOCKET=" + systemd.path(), "WATCHDOG_USEC=300000", vmsyncBinary(), "standby",
                   "--insecure", "--server", address, "--device", "B", "--vm", "work", "--state", dir / "B"},
                  dir / "B.log");
  std::vector<std::string> before;
  const std::string ready = systemd.waitFor("READY=1", std::chrono::seconds(30), &before);
  ASSERT_NE(ready, "") << readFile(dir / "B.log");
  EXPECT_NE(ready.find("STATUS=standby"), std::string::npos) << ready;
  // Registered by then: the server lists the device.
  std::string out;
  ASSERT_EQ(run({vmsyncBinary(), "status", "--insecure", "--server", address, "--vm", "work", "--json"}, &out), 0)
      << out;
  bool listed = false;
  const auto listing = nlohmann::json::parse(out);
  for (const auto& device : listing["devices"]) listed = listed || device["device"] == "B";
  EXPECT_TRUE(listed) << out;
  EXPECT_NE(systemd.waitFor("WATCHDOG=1", std::chrono::seconds(2), nullptr), "");

  ::kill(standby.pid(), SIGTERM);
  EXPECT_NE(systemd.waitFor("STOPPING=1", std::chrono::seconds(10), nullptr), "") << readFile(dir / "B.log");
  const int status = standby.stop();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
}

}  // namespace
}  // namespace vmsync::testing
