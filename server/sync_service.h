// The RPC face of the server: wire::SyncServer and wire::DeviceSession, each
// request routed to the VM it names.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "transport/secure_channel.h"
#include "vmsync.capnp.h"

namespace vmsync {

class SyncServer;

/// The VMs a server holds, as the RPC layer finds them.
class VmCatalog {
 public:
  virtual ~VmCatalog() noexcept(false) = default;  // a VM's members may throw on destruction (kj)
  /// The VM a request of `peer` names: "NAME" (one of the peer's user's),
  /// "USER/NAME", or empty for the default VM. Throws Error, recorded in the
  /// audit log, when `peer` may not `action` it; when it does not exist and
  /// `create` is false; when it cannot be created.
  virtual SyncServer& vm(const PeerIdentity& peer, const std::string& name, const char* action, bool create) = 0;
  /// The VMs `peer` may list: its user's (every VM on a server without TLS).
  virtual std::vector<SyncServer*> vmsOf(const PeerIdentity& peer) = 0;
  /// Records the refusal of `action` to `peer` for `reason` (a refusal that
  /// names no VM), and throws it.
  [[noreturn]] virtual void refuse(const PeerIdentity& peer, const char* action, const std::string& reason) = 0;
};

/// The name a request means by an empty VM name.
inline constexpr const char* kDefaultVmName = "vm";

/// The capability a client bootstraps, acting for `peer`; `gate` (if any) is
/// told when the peer is authorized for a VM, which lifts its message limits.
wire::SyncServer::Client syncServiceClient(VmCatalog& catalog, const PeerIdentity& peer,
                                           std::shared_ptr<ConnectionGate> gate);

}  // namespace vmsync
