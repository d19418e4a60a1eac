// Cap'n Proto RPC plumbing shared by the devices and the server.
#pragma once

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include <cstdint>
#include <string>

namespace vmsync {

/// Reader limits for RPC messages: checkpoints may be large (a full sync of
/// guest RAM), so the traversal limit is raised to `kMaxMessageBytes`; nesting
/// stays at Cap'n Proto's default.
inline constexpr std::uint64_t kMaxMessageBytes = 2ull << 30;
capnp::ReaderOptions rpcReaderOptions();

/// One two-party RPC connection and its bootstrap capability.
class RpcConnection {
 public:
  RpcConnection(kj::Own<kj::AsyncIoStream> stream, capnp::rpc::twoparty::Side side,
                capnp::Capability::Client bootstrap);
  /// The other side's bootstrap capability.
  capnp::Capability::Client bootstrap();
  /// Resolves when the connection ends.
  kj::Promise<void> onDisconnect() { return network_.onDisconnect(); }

 private:
  kj::Own<kj::AsyncIoStream> stream_;
  capnp::TwoPartyVatNetwork network_;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc_;
};

/// Connects to "host:port" as a client.
kj::Promise<kj::Own<RpcConnection>> connectRpc(kj::AsyncIoContext& io, const std::string& address);

/// Accepts connections on `listener` forever, serving `bootstrap` on each.
kj::Promise<void> serveRpc(kj::ConnectionReceiver& listener, capnp::Capability::Client bootstrap);

}  // namespace vmsync
