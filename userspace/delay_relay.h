// A TCP relay that holds every byte for a fixed one-way delay in each
// direction: the latency part of an emulated mobile link (the kernel here has
// no netem qdisc; bandwidth is shaped by tc, outages by taking the link down).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <functional>
#include <string>

namespace vmsync {

/// Settings of one relay.
struct DelayRelayOptions {
  std::string listenHost;               // address to accept on, e.g. the server side of a veth
  std::uint16_t listenPort = 0;
  std::string targetHost = "127.0.0.1"; // where each accepted connection is relayed to
  std::uint16_t targetPort = 0;
  std::chrono::milliseconds oneWayDelay{0};
  /// Network namespace (name under /run/netns) the relay's sockets live in;
  /// empty: the caller's.
  std::string networkNamespace;
};

/// Accepts connections and relays each to the target, delaying every byte by
/// the one-way delay in both directions. Runs on its own threads; the
/// destructor closes every connection and joins them.
class DelayRelay {
 public:
  /// Throws Error when it cannot enter the namespace or listen.
  explicit DelayRelay(DelayRelayOptions options);
  ~DelayRelay();
  DelayRelay(const DelayRelay&) = delete;
  DelayRelay& operator=(const DelayRelay&) = delete;

  /// Connections accepted so far.
  std::uint64_t connections() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// Enters the network namespace `name` (under /run/netns) on the calling
/// thread; "" stays. Sockets made and processes forked by the thread live there.
void enterNetworkNamespace(const std::string& name);

/// Socket options that make a dead link fail a TCP connection within about
/// `kDeadLinkSeconds` instead of TCP's default quarter of an hour: keepalive
/// probes while idle, and a limit on how long sent data may stay unacknowledged.
inline constexpr int kDeadLinkSeconds = 20;
inline constexpr int kKeepaliveIdleSeconds = 5;      // idle time before the first probe
inline constexpr int kKeepaliveIntervalSeconds = 2;  // between probes
/// Applies them through `set` (setsockopt on some socket, true when it took
/// the option); returns false when one was refused.
using SetSocketOption = std::function<bool(int level, int name, const void* value, unsigned length)>;
bool detectDeadLink(const SetSocketOption& set);
/// The same on a connected socket.
bool detectDeadLink(int fd);

}  // namespace vmsync
