// The audit trail: one JSON line per security-relevant decision (a refusal,
// an enrollment, a revocation, a lease grant, a switch, a failover), for the
// people who run the server to read after the fact.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace vmsync {

/// What one line says. Empty fields are left out of the line.
struct AuditEvent {
  std::string action;  // "register", "status", "switch", "connect", "enroll", "revoke", "lease", "failover", ...
  std::string result;  // "refused", "granted", "done", "closed", ...
  std::string user;
  std::string device;
  std::string vm;
  std::string reason;  // why, in words a person reads
  std::string from;    // the network address, where one is known
};

/// Appends AuditEvents to a file (mode 0600), one JSON object per line with
/// its UTC time. Lines are written with one write(2) each in append mode, so
/// concurrent writers never interleave within a line.
class AuditLog {
 public:
  /// Opens (creates) `path`; throws Error naming it when it cannot.
  explicit AuditLog(std::string path);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  /// Writes `event`. A failure to write is logged, not thrown: an audit line
  /// lost never stops the service it describes.
  void record(const AuditEvent& event);
  /// Like record(), but at most one line per `key` per `interval`; the lines
  /// held back are counted in the next line of that key ("suppressed": N).
  /// For what a client can repeat at will (failed handshakes).
  void recordLimited(const std::string& key, const AuditEvent& event,
                     std::chrono::milliseconds interval = std::chrono::seconds(10));

  const std::string& path() const { return path_; }

 private:
  void write(const AuditEvent& event, std::uint64_t suppressed);

  std::string path_;
  int fd_ = -1;
  std::mutex mutex_;
  struct Limited {
    std::chrono::steady_clock::time_point last;
    std::uint64_t suppressed = 0;
  };
  std::map<std::string, Limited> limited_;
};

}  // namespace vmsync
