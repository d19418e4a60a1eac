#include "vmm/qmp_client.h"

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "base/error.h"

namespace vmsync {

namespace {
constexpr auto kReplyTimeout = std::chrono::seconds(60);
}

QmpClient::QmpClient(const std::string& path, std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) fail("QMP socket path {} is too long", path);
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    socket_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (socket_ < 0) throwLastErrno("cannot create QMP socket");
    if (::connect(socket_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) break;
    int err = errno;
    ::close(socket_);
    socket_ = -1;
    if ((err != ENOENT && err != ECONNREFUSED) || std::chrono::steady_clock::now() > deadline)
      throwErrno(err, fmt::format("cannot connect to QEMU monitor {}", path));
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  nlohmann::json greeting = receive();
  if (!greeting.contains("QMP")) fail("QEMU monitor {} did not greet with QMP", path);
  execute("qmp_capabilities");
}

QmpClient::~QmpClient() {
  if (socket_ >= 0) ::close(socket_);
}

void QmpClient::send(const nlohmann::json& message, int fd) {
  std::string text = message.dump() + "\n";
  iovec iov{text.data(), text.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
  }
  ssize_t n = ::sendmsg(socket_, &msg, MSG_NOSIGNAL);
  if (n < 0) throwLastErrno("cannot send to QEMU monitor");
  // The fd travels with the first byte; the rest is plain data.
  std::size_t done = static_cast<std::size_t>(n);
  while (done < text.size()) {
    n = ::send(socket_, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      throwLastErrno("cannot send to QEMU monitor");
    }
    done += static_cast<std::size_t>(n);
  }
}

nlohmann::json QmpClient::receive() {
  auto deadline = std::chrono::steady_clock::now() + kReplyTimeout;
  while (true) {
    auto newline = buffer_.find('\n');
    if (newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      try {
        return nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail("QEMU monitor sent malformed JSON: {}", e.what());
      }
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) fail("QEMU monitor did not answer within {} s", kReplyTimeout.count());
    pollfd pfd{socket_, POLLIN, 0};
    int ready = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (ready < 0) {
      if (errno == EINTR) continue;
      throwLastErrno("cannot wait for QEMU monitor");
    }
    if (ready == 0) continue;
    char chunk[65536];
    ssize_t n = ::recv(socket_, chunk, sizeof chunk, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throwLastErrno("cannot read QEMU monitor");
    }
    if (n == 0) fail("QEMU closed its monitor connection (did it exit?)");
    buffer_.append(chunk, static_cast<std::size_t>(n));
  }
}

nlohmann::json QmpClient::awaitReturn(const std::string& command) {
  while (true) {
    nlohmann::json reply = receive();
    if (reply.contains("event")) {
      spdlog::debug("QMP event {}", reply.dump());
      continue;
    }
    if (reply.contains("error")) {
      const auto& error = reply["error"];
      fail("QMP {}: {}", command, error.value("desc", error.dump()));
    }
    if (reply.contains("return")) return reply["return"];
    fail("QMP {}: unexpected reply {}", command, reply.dump());
  }
}

nlohmann::json QmpClient::execute(const std::string& command, const nlohmann::json& arguments) {
  nlohmann::json message{{"execute", command}};
  if (!arguments.is_null()) message["arguments"] = arguments;
  send(message, -1);
  return awaitReturn(command);
}

nlohmann::json QmpClient::executeWhenAllowed(const std::string& command, const nlohmann::json& arguments,
                                             std::string_view refusal, std::chrono::milliseconds pause,
                                             std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    try {
      return execute(command, arguments);
    } catch (const Error& e) {
      if (std::string_view(e.what()).find(refusal) == std::string_view::npos ||
          std::chrono::steady_clock::now() > deadline)
        throw;
    }
    std::this_thread::sleep_for(pause);
  }
}

nlohmann::json QmpClient::executeWithFd(const std::string& command, const nlohmann::json& arguments, int fd) {
  nlohmann::json message{{"execute", command}};
  if (!arguments.is_null()) message["arguments"] = arguments;
  send(message, fd);
  return awaitReturn(command);
}

}  // namespace vmsync
