// The VMs one server holds: each user's, by name, each in a directory of its
// own (DATA/vms/USER/NAME) with its own chain, lease, epoch, resumable points
// and compaction.
#pragma once

#include <kj/timer.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sync_server.h"
#include "sync_service.h"

namespace vmsync {

class AuditLog;

/// Limits on what one user may hold (0 turns a limit off).
struct UserLimits {
  std::uint64_t vms = 16;            // VMs per user
  std::uint64_t storedBytes = 0;     // bytes of all the user's chains on the server
  double checkpointsPerSecond = 0;   // pushes stored per second, over a burst of 10 s of them
};

/// How every VM of a registry is run.
struct VmSettings {
  CompactionLimits compaction;
  kj::Timer* timer = nullptr;
  StoreRecovery recovery;
  std::chrono::milliseconds leaseTimeout{30000};
  AuditLog* audit = nullptr;
  UserLimits user;
  /// Pushes all VMs may be storing at once (nullptr: no limit), one unit each.
  std::shared_ptr<ServerBudget> pushSlots;
  /// Folds all VMs may run at once (nullptr: no limit), one unit each.
  std::shared_ptr<ServerBudget> foldSlots;
  /// What every VM counts for Prometheus (nullptr: nothing).
  std::shared_ptr<ServerMetrics> metrics;
};

/// The directory under DATA/vms/ that holds the VMs of clients of a server
/// without TLS (no user name can be spelled with '@').
inline constexpr const char* kNoUserDirectory = "@insecure";

class VmRegistry final : public VmCatalog {
 public:
  /// Opens every VM under `dataDir`. A data directory from before VMs had
  /// names (one VM, its chain at the top) is moved, entry by entry, into
  /// vms/OWNER/NAME first; a crash during the move is finished at the next
  /// start. A VM that cannot be opened (a damaged record, a directory it may
  /// not use) is left out of service with the reason, logged; the others
  /// are served, and a request for it is refused with that reason.
  VmRegistry(std::string dataDir, VmSettings settings);
  ~VmRegistry() override;

  SyncServer& vm(const PeerIdentity& peer, const std::string& name, const char* action, bool create) override;
  std::vector<SyncServer*> vmsOf(const PeerIdentity& peer) override;
  [[noreturn]] void refuse(const PeerIdentity& peer, const char* action, const std::string& reason) override;

  /// The credentials of `device` of `user` (every device of the user when
  /// `device` is empty) were revoked: each of the user's VMs fences it.
  void revoked(const std::string& user, const std::string& device, const std::string& why);
  /// Every VM, by "USER/NAME".
  const std::map<std::string, std::unique_ptr<SyncServer>>& vms() const { return vms_; }

 private:
  /// Moves a single-VM data directory's chain into vms/OWNER/NAME.
  void adoptSingleVmLayout();
  /// Throws Error when storing `checkpoint` (`bytes`) in `vm` would pass a
  /// quota of the user whose directory is `userDir`. The final checkpoint of
  /// a switch or a park passes always: the VM can always be moved or parked.
  void admitPush(const std::string& userDir, SyncServer& vm, wire::Checkpoint::Reader checkpoint,
                 std::uint64_t bytes);
  SyncServer& open(const std::string& userDir, const std::string& name);

  std::string dir_;
  VmSettings settings_;
  std::map<std::string, std::unique_ptr<SyncServer>> vms_;  // key: userDir + "/" + name
  std::map<std::string, std::string> outOfService_;          // key: why it could not be opened at start
  struct Bucket {
    double tokens = 0;
    std::chrono::steady_clock::time_point refilled;
    bool started = false;
  };
  std::map<std::string, Bucket> rates_;  // by user directory
};

}  // namespace vmsync
