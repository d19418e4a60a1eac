// A QMP client: JSON commands over QEMU's monitor socket.
#pragma once

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace vmsync {

/// One connection to a QEMU monitor socket. Commands are synchronous; events that
/// arrive meanwhile are skipped (logged at debug level).
class QmpClient {
 public:
  /// Connects to the unix socket at `path` and negotiates capabilities, retrying
  /// until `timeout` while the socket does not exist yet.
  QmpClient(const std::string& path, std::chrono::milliseconds timeout);
  ~QmpClient();
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  /// Runs `command` with `arguments` and returns its "return" member. Throws
  /// Error("QMP <command>: <QEMU's error description>") when QEMU refuses.
  nlohmann::json execute(const std::string& command, const nlohmann::json& arguments = nullptr);

  /// Like execute(), passing `fd` along with the command (SCM_RIGHTS), as
  /// `getfd` needs.
  nlohmann::json executeWithFd(const std::string& command, const nlohmann::json& arguments, int fd);

  /// Like execute(), but while QEMU refuses with an error containing
  /// `refusal` (a state it leaves by itself, such as a migration still
  /// finishing) it tries again every `pause`, for up to `timeout`; then, or
  /// for any other error, it throws as execute() does.
  nlohmann::json executeWhenAllowed(const std::string& command, const nlohmann::json& arguments,
                                    std::string_view refusal, std::chrono::milliseconds pause,
                                    std::chrono::seconds timeout);

 private:
  void send(const nlohmann::json& message, int fd);
  nlohmann::json receive();
  nlohmann::json awaitReturn(const std::string& command);

  int socket_ = -1;
  std::string buffer_;
};

}  // namespace vmsync
