// A TCP relay that holds every byte for a fixed one-way delay in each
// direction: the latency part of an emulated mobile link (the kernel here has
// no netem qdisc; bandwidth is shaped by tc, outages by taking the link down).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
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

  /// Changes the delay of bytes read from now on, on open connections too.
  void setOneWayDelay(std::chrono::milliseconds delay);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// Enters the network namespace `name` (under /run/netns) on the calling
/// thread; "" stays. Sockets made and processes forked by the thread live there.
void enterNetworkNamespace(const std::string& name);

/// Applies the dead-link socket options (rpc_util.h) to a connected socket;
/// returns false when the kernel refused one.
bool detectDeadLink(int fd);

}  // namespace vmsync
