// A TCP relay that holds every byte for a one-way delay in each direction,
// plus a seeded random jitter: the latency part of an emulated mobile link
// (the kernel here has no netem qdisc; bandwidth is shaped by tc, loss and
// outages are dropped by a BPF program, see link_loss.h).
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
  /// Each chunk read is held a further random time in [0, jitter]; bytes
  /// stay in order (a chunk never leaves before the one read before it).
  std::chrono::milliseconds jitter{0};
  /// Starts the jitter draws: connection n's directions draw from streams
  /// of their own, fixed by the seed and n.
  std::uint64_t seed = 1;
  /// Network namespace (name under /run/netns) the relay's sockets live in;
  /// empty: the caller's.
  std::string networkNamespace;
};

/// Accepts connections and relays each to the target, delaying every byte by
/// the one-way delay (and its jitter) in both directions. Runs on its own threads; the
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
  /// Changes the jitter of bytes read from now on, on open connections too.
  void setJitter(std::chrono::milliseconds jitter);

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
