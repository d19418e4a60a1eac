#include "base/audit_log.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>

#include "base/error.h"

namespace vmsync {

namespace {

std::string utcNow() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
  const auto millis =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&seconds, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &tm);
  return fmt::format("{}.{:03}Z", text, millis);
}

}  // namespace

AuditLog::AuditLog(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd_ < 0) fail("cannot open the audit log {}: {}", path_, std::strerror(errno));
}

AuditLog::~AuditLog() {
  if (fd_ >= 0) ::close(fd_);
}

void AuditLog::write(const AuditEvent& event, std::uint64_t suppressed) {
  nlohmann::json line{{"time", utcNow()}, {"action", event.action}, {"result", event.result}};
  for (const auto& [name, value] : {std::pair<const char*, const std::string*>{"user", &event.user},
                                    {"device", &event.device},
                                    {"vm", &event.vm},
                                    {"reason", &event.reason},
                                    {"from", &event.from}})
    if (!value->empty()) line[name] = *value;
  if (suppressed != 0) line["suppressed"] = suppressed;
  // Replace what is not UTF-8 (a name from a hostile client) instead of throwing.
  std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  const ssize_t written = ::write(fd_, text.data(), text.size());
  if (written != static_cast<ssize_t>(text.size()))
    spdlog::warn("audit log {}: cannot append a line ({}): {}", path_,
                 written < 0 ? std::strerror(errno) : "short write", text.substr(0, text.size() - 1));
}

void AuditLog::record(const AuditEvent& event) {
  std::lock_guard lock(mutex_);
  write(event, 0);
}

void AuditLog::recordLimited(const std::string& key, const AuditEvent& event, std::chrono::milliseconds interval) {
  std::lock_guard lock(mutex_);
  const auto now = std::chrono::steady_clock::now();
  auto [it, fresh] = limited_.try_emplace(key);
  if (!fresh && now - it->second.last < interval) {
    ++it->second.suppressed;
    return;
  }
  write(event, it->second.suppressed);
  it->second = Limited{now, 0};
  if (limited_.size() > 4096) limited_.clear();  // bounded whatever the clients do
}

}  // namespace vmsync
