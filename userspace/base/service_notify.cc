#include "base/service_notify.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace vmsync {
namespace {

std::string takeEnvironment(const char* name) {
  const char* value = std::getenv(name);
  std::string taken = value != nullptr ? value : "";
  ::unsetenv(name);
  return taken;
}

/// A STATUS value is one line.
std::string oneLine(std::string text) {
  for (char& c : text)
    if (c == '\n') c = ' ';
  return text;
}

}  // namespace

ServiceNotifier::ServiceNotifier() {
  socket_ = takeEnvironment("NOTIFY_SOCKET");
  const std::string usec = takeEnvironment("WATCHDOG_USEC");
  const std::string pid = takeEnvironment("WATCHDOG_PID");
  // The watchdog is this process's when WATCHDOG_PID is absent or names it.
  if (!usec.empty() && (pid.empty() || std::strtoll(pid.c_str(), nullptr, 10) == ::getpid()))
    watchdogUsec_ = std::strtoull(usec.c_str(), nullptr, 10);
  if (!socket_.empty() && socket_[0] != '/' && socket_[0] != '@') {
    spdlog::warn("NOTIFY_SOCKET={} is neither a path nor an abstract socket (@name); not notifying systemd", socket_);
    socket_.clear();
  }
}

void ServiceNotifier::send(const std::string& message) const {
  if (socket_.empty()) return;
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (socket_.size() >= sizeof(address.sun_path)) {
    spdlog::warn("NOTIFY_SOCKET {} is too long for a socket address; not notifying systemd", socket_);
    return;
  }
  std::memcpy(address.sun_path, socket_.data(), socket_.size());
  if (address.sun_path[0] == '@') address.sun_path[0] = '\0';  // abstract namespace
  const socklen_t length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + socket_.size());
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    spdlog::warn("cannot notify systemd ({}): socket: {}", message.substr(0, message.find('\n')), std::strerror(errno));
    return;
  }
  if (::sendto(fd, message.data(), message.size(), MSG_NOSIGNAL, reinterpret_cast<const sockaddr*>(&address),
               length) < 0)
    spdlog::warn("cannot notify systemd at {} ({}): {}", socket_, message.substr(0, message.find('\n')),
                 std::strerror(errno));
  ::close(fd);
}

void ServiceNotifier::ready(const std::string& status) const { send("READY=1\nSTATUS=" + oneLine(status)); }

void ServiceNotifier::stopping(const std::string& status) const { send("STOPPING=1\nSTATUS=" + oneLine(status)); }

void ServiceNotifier::status(const std::string& status) const { send("STATUS=" + oneLine(status)); }

kj::Promise<void> ServiceNotifier::watchdog(kj::Timer& timer) const {
  if (socket_.empty() || watchdogUsec_ == 0) return kj::NEVER_DONE;
  send("WATCHDOG=1");
  return timer.afterDelay(watchdogUsec_ / 2 * kj::MICROSECONDS).then([this, &timer] { return watchdog(timer); });
}

}  // namespace vmsync
