// Telling systemd where a daemon is (units with Type=notify and WatchdogSec):
// READY=1 once the server listens or the device has registered, STOPPING=1
// when a graceful stop begins, and WATCHDOG=1 from the event loop at half the
// unit's WatchdogSec, so that a loop that hangs gets the daemon restarted.
//
// The protocol is sd_notify(3)'s: datagrams to the socket NOTIFY_SOCKET
// names. It is small and stable, so it is spoken here directly rather than
// through libsystemd. Outside systemd (no NOTIFY_SOCKET) nothing is sent.
#pragma once

#include <kj/async.h>
#include <kj/timer.h>

#include <string>

namespace vmsync {

class ServiceNotifier {
 public:
  /// Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, and removes them
  /// from the environment, so that the processes this one starts (QEMU) do
  /// not speak for it. Construct once, early in main.
  ServiceNotifier();

  /// READY=1 with a one-line STATUS.
  void ready(const std::string& status) const;
  /// STOPPING=1 with a one-line STATUS.
  void stopping(const std::string& status) const;
  /// STATUS alone: what the daemon does now.
  void status(const std::string& status) const;

  /// Sends WATCHDOG=1 every half of WATCHDOG_USEC from the event loop of
  /// `timer`, until dropped; never resolves. Without a watchdog for this
  /// process, a promise that never resolves and sends nothing.
  kj::Promise<void> watchdog(kj::Timer& timer) const;

  /// Whether systemd listens (NOTIFY_SOCKET was set).
  bool enabled() const { return !socket_.empty(); }

 private:
  void send(const std::string& message) const;

  std::string socket_;
  std::uint64_t watchdogUsec_ = 0;
};

}  // namespace vmsync
