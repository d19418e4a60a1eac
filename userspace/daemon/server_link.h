// The device's connection to the sync server: connect, register, keep the
// messages of pushes under way alive, notice a lost connection and register
// again with backoff, and remember the push whose answer never came.
#pragma once

#include <kj/async-io.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpoint_builder.h"
#include "daemon/device.h"
#include "transport/address_watch.h"
#include "transport/rpc_util.h"
#include "transport/secure_channel.h"
#include "vmsync.capnp.h"

namespace vmsync {

/// A checkpoint on its way to the server.
struct PendingPush {
  ImageDelta memory;
  ImageDelta disk;
  std::uint64_t sequence = 0;
  /// "lease epoch E, checkpoint digest D" of the message sent (see
  /// checkpoint/checkpoint_identity.h), logged once the server has it.
  std::string identity;
  /// When it was sent (nowNs), for the log when it fails.
  std::uint64_t sentNs = 0;
  /// A final checkpoint's RAM: every unit compared (else the page source's
  /// list taken), and then how many changed units the source had not reported.
  bool ramFullCompare = true;
  std::uint64_t ramMissed = 0;
};

using Registration = capnp::Response<wire::SyncServer::RegisterResults>;

/// Where a device's image is, as it registers.
struct ChainPosition {
  std::uint64_t applied = 0;  // the last checkpoint it holds (0: none)
  std::uint64_t epoch = 0;    // that checkpoint's lease epoch (0: not known)
  bool diverged = false;      // its VM ran past that checkpoint
};

class ServerLink {
 public:
  /// `makePeer` gives the capability the server calls this device by;
  /// `position` where to register again after a lost connection.
  ServerLink(kj::AsyncIoContext& io, const DeviceOptions& options,
             std::function<wire::DevicePeer::Client()> makePeer, std::function<ChainPosition()> position);

  /// Connects and registers at `position`; fails ("cannot reach the sync
  /// server ...") when that takes longer than the dead-link timeout.
  kj::Promise<Registration> connect(ChainPosition position);
  /// connect() until a server answers: a server that cannot be reached (not
  /// started yet, a link down, a registration that timed out) is tried again
  /// with the reconnect backoff, said at the first failure and every 30 s; a
  /// refusal fails at once.
  kj::Promise<Registration> connectWhenReachable(std::function<ChainPosition()> position);
  /// Called after each registration that follows a lost connection; a
  /// failure it throws is logged and ends the attempts.
  void onReconnected(std::function<kj::Promise<void>(Registration)> handler) { onReconnected_ = std::move(handler); }
  /// The server's lease timeout, from the last registration.
  std::chrono::milliseconds leaseTimeout() const { return leaseTimeout_; }

  bool connected() const { return session_.has_value(); }
  /// Drops the connection and registers again (at `position()`).
  void restart();
  /// The session of the current registration; throws Error when there is none.
  wire::DeviceSession::Client& session();

  /// `push`'s message is on its way on the current connection: it references
  /// the push's payloads, which must live until the server answers or the
  /// connection is gone.
  void holdWhileSending(const std::shared_ptr<const PendingPush>& push) { sending_.push_back(push); }
  /// The server answered `push`: it has read all of its message.
  void sent(const std::shared_ptr<const PendingPush>& push) { std::erase(sending_, push); }

  /// The last push whose answer never came (the server may hold it).
  void markUnconfirmed(std::shared_ptr<PendingPush> push) { unconfirmed_ = std::move(push); }
  const std::shared_ptr<PendingPush>& unconfirmed() const { return unconfirmed_; }
  std::shared_ptr<PendingPush> takeUnconfirmed() { return std::exchange(unconfirmed_, nullptr); }

  /// Logs the progress of a push of `bytes` on the current connection while the promise lives.
  kj::Promise<void> watchTransfer(std::string what, std::uint64_t bytes);
  std::string lastRefusal_;  // the last refusal of a reconnection that was logged

 private:
  /// The transport `options` ask for; a credential must be this device's.
  static ClientTransport transportFor(const DeviceOptions& options);
  void onDisconnected();
  /// An address of this device went away: if the connection was from it,
  /// it is dead, and the device connects again at once.
  void onAddressGone(const std::string& address);
  /// Connects and registers, with no time limit (connect() sets one).
  kj::Promise<Registration> attempt(ChainPosition position);
  kj::Promise<void> reconnectLoop(std::chrono::milliseconds delay);
  kj::Promise<Registration> connectWhenReachable(std::function<ChainPosition()> position,
                                                 std::chrono::milliseconds delay, std::chrono::milliseconds waited);
  /// True for a failure to reach the server (worth trying again), false for a refusal.
  static bool unreachable(const kj::Exception& e);

  kj::AsyncIoContext& io_;
  const DeviceOptions& options_;
  std::function<wire::DevicePeer::Client()> makePeer_;
  std::function<ChainPosition()> position_;
  std::function<kj::Promise<void>(Registration)> onReconnected_;
  std::chrono::milliseconds leaseTimeout_{30000};
  ClientTransport transport_;

  /// Pushes whose message on `connection_` references their payloads (toWire()
  /// does not copy them). Declared before it, so it outlives it.
  std::vector<std::shared_ptr<const PendingPush>> sending_;
  std::shared_ptr<PendingPush> unconfirmed_;
  kj::Own<RpcConnection> connection_;
  std::optional<wire::SyncServer::Client> server_;
  std::optional<wire::DeviceSession::Client> session_;
  kj::Maybe<kj::Promise<void>> watch_;      // notices a lost connection
  kj::Maybe<kj::Promise<void>> reconnect_;  // reconnection attempts
  std::unique_ptr<AddressWatch> addressWatch_;  // last: it calls back into the above
};

}  // namespace vmsync
