// Cap'n Proto RPC plumbing shared by the devices and the server.
#pragma once

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "base/error.h"

namespace vmsync {

/// Socket options that make a dead link fail a TCP connection within about
/// deadLinkSeconds() instead of TCP's default quarter of an hour: keepalive
/// probes while idle, and a limit on how long sent data may stay unacknowledged.
inline constexpr int kDefaultDeadLinkSeconds = 20;
/// The shortest dead-link timeout: a probe needs a second to go and come back.
inline constexpr int kMinDeadLinkSeconds = 2;
/// The timeout of this process's connections (`--dead-link-timeout`;
/// kDefaultDeadLinkSeconds unless set). Set it before connections are made:
/// those already made keep theirs.
int deadLinkSeconds();
void setDeadLinkSeconds(int seconds);  // throws Error below kMinDeadLinkSeconds
/// The keepalive settings that find a dead link within `deadLinkSeconds`: the
/// first probe after a quarter of it idle (at most 5 s), probes every sixth of
/// it (1 to 2 s, more where 127 probes would not reach) until the timeout,
/// and sent data unacknowledged for as long.
struct DeadLinkProbes {
  int idleSeconds = 0;
  int intervalSeconds = 0;
  int count = 0;
  unsigned userTimeoutMs = 0;
};
DeadLinkProbes deadLinkProbes(int deadLinkSeconds);
/// Applies deadLinkProbes(deadLinkSeconds()) through `set` (setsockopt on
/// some socket, true when it took the option); returns false when one was refused.
using SetSocketOption = std::function<bool(int level, int name, const void* value, unsigned length)>;
bool detectDeadLink(const SetSocketOption& set);

/// Reader limits for RPC messages: checkpoints may be large (a full sync of
/// guest RAM), so the traversal limit is raised to `kMaxMessageBytes`; nesting
/// stays at Cap'n Proto's default.
inline constexpr std::uint64_t kMaxMessageBytes = 2ull << 30;
capnp::ReaderOptions rpcReaderOptions();

/// The traversal limit an RPC connection reads a message of `words` words
/// with: `kTraversalPerWord` times its size, at least `kMinTraversalWords`, at
/// most rpcReaderOptions()'s. A list of empty structs costs one word per
/// element however few bytes it takes, and the RPC layer allocates per
/// element of a capability table: under one limit for every message, a few
/// hundred bytes could make it allocate gigabytes. Tied to the message's size,
/// what reading a message can cost follows what was sent. The factor leaves
/// room for the several passes the server and the devices make over a
/// checkpoint (validation, the store's copy, merging, applying).
inline constexpr std::uint64_t kTraversalPerWord = 32;
inline constexpr std::uint64_t kMinTraversalWords = 1u << 16;
std::uint64_t traversalLimitFor(std::uint64_t words);

/// One two-party RPC connection and its bootstrap capability.
class RpcConnection {
 public:
  RpcConnection(kj::Own<kj::AsyncIoStream> stream, capnp::rpc::twoparty::Side side,
                capnp::Capability::Client bootstrap);
  /// The other side's bootstrap capability.
  capnp::Capability::Client bootstrap();
  /// Bytes sent on this connection that the other end (or the first relay on
  /// the way) has acknowledged, from the kernel's TCP_INFO; nullopt where the
  /// stream is not a TCP socket. For progress reports of long transfers.
  std::optional<std::uint64_t> bytesAcknowledged();
  /// This end's IP address (as inet_ntop writes it), or nullopt where the
  /// stream is not an IP socket.
  std::optional<std::string> localAddress();
  /// Resolves when the connection ends.
  kj::Promise<void> onDisconnect() { return network_.onDisconnect(); }

 private:
  kj::Own<kj::AsyncIoStream> stream_;
  kj::Own<capnp::MessageStream> messages_;  // reads each message under traversalLimitFor() its size
  capnp::TwoPartyVatNetwork network_;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc_;
};

/// Throws an RPC error whose description is exactly `message` (what the
/// caller on the other side shows its user).
[[noreturn]] void rpcFail(const std::string& message);

/// The description of a (possibly remote) error, without RPC decoration.
std::string describe(const kj::Exception& e);

/// Runs `body`, turning vmsync::Error into an RPC error with the same message.
template <typename Body>
auto guarded(Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Error& e) {
    rpcFail(e.what());
  }
}

/// Monotonic clock in nanoseconds, for the latency reports.
inline std::uint64_t nowNs() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

/// Connects to "host:port" as a client.
kj::Promise<kj::Own<RpcConnection>> connectRpc(kj::AsyncIoContext& io, const std::string& address);

/// Accepts connections on `listener` forever, serving `bootstrap` on each.
kj::Promise<void> serveRpc(kj::ConnectionReceiver& listener, capnp::Capability::Client bootstrap);

}  // namespace vmsync
