// What a connection may make the server hold in memory. Every incoming Cap'n
// Proto message is measured from its segment table as its bytes arrive,
// before the RPC layer allocates room for it: a client that is not yet
// authorized may send only small messages, and an authorized user's
// connections together may have only so many bytes of messages under way.
#pragma once

#include <kj/async-io.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "transport/rpc_util.h"

namespace vmsync {

struct MessageLimits {
  /// Largest message before the connection's device is authorized: enough
  /// for a registration or a status request, not for a checkpoint.
  std::uint64_t beforeAuthorization = 64 << 10;
  /// Largest message once authorized (a full checkpoint of a large guest).
  std::uint64_t perMessage = kMaxMessageBytes;
  /// Bytes of messages being received at once by all connections of one user.
  std::uint64_t perUser = 4ull << 30;
  /// Bytes of messages all authorized connections of the server may be
  /// receiving at once; past it, connections wait (ServerBudget).
  std::uint64_t perServer = 1ull << 30;
  /// A connection not authorized this long after its handshake is closed.
  std::uint64_t authorizeWithinMs = 5000;
};

/// Bytes of messages under way per user, shared by all connections of a server.
using InFlightByUser = std::map<std::string, std::uint64_t>;

/// Bytes of messages all authorized connections of a server may be receiving
/// at once. A connection whose next message does not fit waits (its stream
/// is not read further) until others' messages are in: backpressure, where
/// the per-user limit closes the connection.
class ServerBudget {
 public:
  explicit ServerBudget(std::uint64_t limit) : limit_(limit) {}
  /// Takes `bytes` at once if they fit and nobody waits before them. A
  /// message larger than the whole budget fits when nothing else is held.
  bool tryTake(std::uint64_t bytes);
  /// Resolves once `bytes` are taken, after those who waited before.
  kj::Promise<void> take(std::uint64_t bytes);
  /// Gives back bytes taken, and lets waiters in, in order.
  void give(std::uint64_t bytes);
  std::uint64_t used() const { return used_; }
  std::uint64_t limit() const { return limit_; }
  std::size_t waiting() const { return waiters_.size(); }

 private:
  bool fits(std::uint64_t bytes) const { return used_ + bytes <= limit_ || used_ == 0; }
  struct Waiter {
    std::uint64_t bytes;
    kj::Own<kj::PromiseFulfiller<void>> fulfiller;
  };
  std::uint64_t limit_;
  std::uint64_t used_ = 0;
  std::deque<Waiter> waiters_;
};

/// The limits of one connection and whether it is authorized yet; shared by
/// the stream that measures messages and the server that authorizes.
class ConnectionGate {
 public:
  /// `onViolation` is called once, with the reason, when the connection
  /// breaks a limit (the stream then fails and the connection ends).
  ConnectionGate(MessageLimits limits, std::string user, std::shared_ptr<InFlightByUser> inFlight,
                 std::function<void(const std::string&)> onViolation, std::shared_ptr<ServerBudget> budget = nullptr);
  ~ConnectionGate();

  /// The connection's peer may use the VM: the larger limits apply from the
  /// next message on.
  void authorize() { authorized_ = true; }
  bool authorized() const { return authorized_; }
  const MessageLimits& limits() const { return limits_; }

  /// Takes `bytes` more incoming bytes into account; returns the reason when
  /// they break a limit ("" otherwise). Called by GatedStream.
  std::string take(const kj::byte* bytes, std::size_t size);
  /// Bytes of the message under way that the server's budget has not yet
  /// let in: the stream waits for admitted() before it hands them on.
  std::uint64_t waitingFor() const { return serverWant_; }
  /// Resolves when the server's budget lets the message under way in.
  kj::Promise<void> admitted();
  /// Logs (at most every 10 s) that a message waits for room.
  void noteWaiting();

 private:
  std::string startMessage(std::uint64_t total);
  void endMessage();

  MessageLimits limits_;
  std::string user_;
  std::shared_ptr<InFlightByUser> inFlight_;
  std::function<void(const std::string&)> onViolation_;
  bool authorized_ = false;
  bool violated_ = false;
  // Where the parser stands in the byte stream.
  kj::byte header_[8 + 4 * 512] = {};
  std::size_t headerHave_ = 0;   // bytes of the segment table read so far
  std::size_t headerNeed_ = 4;   // its size, once the segment count is known
  std::uint64_t bodyLeft_ = 0;   // bytes of the message body still to come
  std::uint64_t reserved_ = 0;   // counted in the user's bytes under way
  std::shared_ptr<ServerBudget> budget_;
  std::uint64_t serverHeld_ = 0;  // the message under way's bytes taken from the server's budget
  std::uint64_t serverWant_ = 0;  //   or still to take (it waits)
};

/// `inner`, with every byte read passed through `gate` first; a read that
/// would complete the header of a message over a limit fails instead.
kj::Own<kj::AsyncIoStream> gatedStream(kj::Own<kj::AsyncIoStream> inner, std::shared_ptr<ConnectionGate> gate);

}  // namespace vmsync
