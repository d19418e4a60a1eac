// The sync server: holds the VM's chain, forwards it to standbys, grants the lease.
#pragma once

#include <capnp/message.h>
#include <kj/async.h>
#include <kj/function.h>
#include <kj/timer.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "checkpoint_store.h"
#include "sync_service.h"
#include "transport/message_gate.h"
#include "transport/secure_channel.h"
#include "vmsync.capnp.h"

namespace vmsync {

class ServerMetrics;

/// A device as the server knows it.
struct DeviceEntry {
  std::string id;
  std::optional<wire::DevicePeer::Client> peer;  // set while connected
  std::uint64_t connection = 0;                  // which registration the peer belongs to
  std::uint64_t applied = 0;                     // last sequence the device confirmed
  std::uint64_t queued = 0;                      // last sequence handed to the forwarding chain
  std::string failure;                           // why forwarding stopped, if it did
  kj::Maybe<kj::ForkedPromise<void>> tail;       // in-order forwarding chain
  std::uint64_t lastForwardNs = 0;               // round trip of the last apply call
  std::uint64_t lastApplyNs = 0;                 // the device's own apply time for it
  std::uint64_t sendingSequence = 0;             // apply call under way: up to which sequence
  std::uint64_t sendingBytes = 0;                // its size
  std::uint64_t sendingSinceNs = 0;              // when it was sent
  std::uint64_t sentBytes = 0;                   // every apply call's size, for reports
  bool resyncing = false;                        // its image left the chain: nothing is forwarded
                                                 //   until a resync brings it back
};

/// When the chain is compacted (0 turns a limit off).
struct CompactionLimits {
  std::uint64_t checkpoints = 128;    // stored checkpoints after the base
  std::uint64_t bytes = 1ull << 30;   // their total size
};

/// One VM: its chain, lease and devices; one instance per VM directory.
/// As a VmCatalog it serves that VM alone (unit tests, benchmarks); a
/// server process holds its VMs in a VmRegistry.
class SyncServer final : public VmCatalog {
 public:
  /// `timer` bounds how long a device that registers again waits for the
  /// answer of its earlier registration (nullptr: a registered device is
  /// never replaced while its connection stands).
  explicit SyncServer(std::string dataDir, CompactionLimits compaction = {}, kj::Timer* timer = nullptr,
                      StoreRecovery recovery = {});
  ~SyncServer() override;

  /// The capability a client bootstraps, acting for `peer`, to this VM alone;
  /// `gate` (if any) is told when the peer is authorized, which lifts its
  /// message limits.
  wire::SyncServer::Client client(const PeerIdentity& peer = {}, std::shared_ptr<ConnectionGate> gate = nullptr);
  /// This VM is `name` of `user` ("" on a server without TLS): its first full
  /// checkpoint must carry that name, and only that user's devices may use it.
  void setIdentity(const std::string& user, const std::string& name);
  /// "USER/NAME" (or "NAME"), as logs and the audit trail name this VM.
  const std::string& label() const { return label_; }

  // VmCatalog, for this one VM.
  SyncServer& vm(const PeerIdentity& peer, const std::string& name, const char* action, bool create) override;
  std::vector<SyncServer*> vmsOf(const PeerIdentity& peer) override;
  /// Where authorization refusals, ownership claims, lease grants, switches
  /// and failovers are recorded (nullptr: nowhere).
  void setAuditLog(AuditLog* audit) { audit_ = audit; }
  /// Records `event` in the audit log, if there is one, naming this VM.
  void audit(AuditEvent event);
  /// Where this VM's pushes, forwards, switches, folds, refusals and device
  /// positions are counted (nullptr: nowhere).
  void setMetrics(std::shared_ptr<ServerMetrics> metrics);
  ServerMetrics* metrics() const { return metrics_.get(); }
  /// Throws Error unless `peer` may `action` this server's VM: on a TLS server
  /// only the devices of the VM's owner may (the first user to register a
  /// device claims an unclaimed server).
  /// Every refusal is recorded in the audit log.
  void authorize(const PeerIdentity& peer, const char* action, bool claim = false);
  /// Records the refusal of `action` to `peer` for `reason`, and throws it.
  [[noreturn]] void refuse(const PeerIdentity& peer, const char* action, const std::string& reason) override;
  /// The credentials of `device` of `user` (every device of the user when
  /// `device` is empty) were revoked. If that is the lease holder, it is
  /// fenced: a forced switch resumes the VM elsewhere without waiting for
  /// the lease timeout, since the device can no longer connect.
  void revoked(const std::string& user, const std::string& device, const std::string& why);

  // The calls behind the RPC interfaces (see schema/vmsync.capnp).
  /// Registers device `id`; refused while an earlier registration of it still
  /// answers, since two daemons would then speak for one device.
  /// `appliedEpoch` is the lease epoch of checkpoint `applied` (0: unknown);
  /// `diverged`: the device's VM ran past that checkpoint. A device whose
  /// image left the chain is brought back by a resync before anything else.
  kj::Promise<std::uint64_t> registerDevice(const std::string& id, wire::DevicePeer::Client peer,
                                            std::uint64_t applied, std::uint64_t appliedEpoch = 0,
                                            bool diverged = false);
  void unregister(const std::string& id, std::uint64_t connection);
  std::uint64_t acquireLease(const std::string& id);
  /// Checks and stores a checkpoint on this thread, returning once it is durable.
  std::uint64_t push(const std::string& id, wire::Checkpoint::Reader checkpoint);
  /// The same as the RPC layer does it: the checkpoint is copied at once,
  /// checked when the pushes of this VM before it are stored, written and
  /// fsynced on a store worker (the event loop, and every other VM's calls,
  /// go on meanwhile), and recorded here once durable. Pushes of one VM are
  /// stored one at a time, in the order they came; errors are RPC errors
  /// with the same messages as push() throws.
  kj::Promise<std::uint64_t> pushAsync(const std::string& id, wire::Checkpoint::Reader checkpoint);
  /// Resolves when the answer to the push of `sequence` (stored) may go out:
  /// at once, except under a test hook (VMSYNC_TEST_HOLD_PUSH_ANSWER_MS).
  kj::Promise<void> answerPush(std::uint64_t sequence);
  void releaseLease(const std::string& id, std::uint64_t epoch);
  void renewLease(const std::string& id, std::uint64_t epoch);
  void setLeaseTimeout(std::chrono::milliseconds timeout) { leaseTimeout_ = timeout; }
  std::chrono::milliseconds leaseTimeout() const { return leaseTimeout_; }
  void fillStatus(wire::ClusterStatus::Builder status);
  /// One line of `vmsync status`: name, head, active device, bytes stored.
  void fillSummary(wire::VmSummary::Builder summary);
  /// Bytes the chain takes on disk: the base and the checkpoints after it.
  std::uint64_t chainBytes() const;
  /// Called with each checkpoint about to be stored (validated, under the
  /// current lease, next in the chain) and its size; throws Error to refuse
  /// it (a quota), and the device ships its changes again later.
  using PushAdmission = std::function<void(SyncServer& vm, wire::Checkpoint::Reader checkpoint, std::uint64_t bytes)>;
  void setPushAdmission(PushAdmission admission) { admitPush_ = std::move(admission); }
  /// Shared by the VMs of a server: a pushAsync() takes one unit before it is
  /// checked and gives it back when stored or refused (nullptr: no limit).
  void setPushSlots(std::shared_ptr<ServerBudget> slots) { pushSlots_ = std::move(slots); }
  /// Shared by the VMs of a server: a fold runs only when it can take a unit
  /// at once (else the next push asks again), and gives it back when done
  /// (nullptr: no limit).
  void setFoldSlots(std::shared_ptr<ServerBudget> slots) { foldSlots_ = std::move(slots); }
  /// Compacts the chain as far as the devices allow, whatever the limits (a
  /// user over its byte quota); nothing when a fold runs already.
  void compactNow(wire::Policy policy) { maybeCompact(policy, /*now=*/true); }
  /// `force`: the active device is lost; after the lease timeout, resume the
  /// VM on `target` from the newest resumable point, abandoning what followed.
  kj::Promise<void> switchTo(const std::string& target, bool force, wire::SwitchReport::Builder report);
  /// Parks the VM: its device pauses it, pushes a final checkpoint and gives the lease back.
  kj::Promise<void> stop(wire::StopReport::Builder report);
  /// True when no device runs the VM and the head is a final checkpoint.
  bool parked() const { return state_.holder.empty() && headIsFinal_; }

  /// The VM's name (from its first full checkpoint, or as setIdentity named it).
  const std::string& vmId() const { return state_.vmId.empty() ? name_ : state_.vmId; }
  /// The user whose VM this is (empty: none yet, or a server without TLS).
  const std::string& owner() const { return state_.owner; }
  std::uint64_t head() const { return store_.head(); }
  /// Expires when this object is destroyed: for what may outlive it.
  std::weak_ptr<void> lifetime() const { return lifetime_; }
  /// True while a fold runs on the worker thread.
  bool compacting() const { return compacting_; }

 private:
  DeviceEntry& device(const std::string& id);
  std::uint64_t completeRegistration(const std::string& id, wire::DevicePeer::Client peer, std::uint64_t applied,
                                     bool resync);
  /// Why a device at `applied` (under lease `epoch`) holds checkpoints a
  /// failover abandoned; empty when it does not.
  std::string abandonedBy(std::uint64_t applied, std::uint64_t epoch) const;
  /// Resumes a parked VM on `target`, after catching it up.
  kj::Promise<void> resumeParked(const std::string& target, wire::SwitchReport::Builder report);
  /// Resumes the parked VM on `id`, which a switch cut short meant to run it
  /// (state.resumeOn), unless the lease is held or a switch runs.
  void resumeInterruptedSwitch(const std::string& id);
  /// At start: a pause (for a switch or a park) whose outcome was not
  /// recorded. When the holder's own final checkpoint is the head, the VM
  /// is parked there once the holder is back and has not asked for its
  /// lease within the lease timeout (one that resumed the VM asks); watched
  /// by timer.
  void recoverInterruptedPause();
  kj::Promise<void> watchPendingPause();
  /// True once the pending pause is settled (or there is none).
  bool settlePendingPause();
  /// Brings `target` to the head while nothing is paused; fills the report's catch-up part.
  kj::Promise<void> catchUpForSwitch(const std::string& target, const std::string& source,
                                     wire::SwitchReport::Builder report, std::uint64_t start);
  /// A switch from a running source: catch up, hand off, take over.
  kj::Promise<void> switchRunning(const std::string& source, const std::string& target,
                                  wire::SwitchReport::Builder report);
  /// After the source stored its final checkpoint: the target applies it and resumes.
  kj::Promise<void> takeOverAfterFinal(const std::string& source, const std::string& target,
                                       wire::SwitchReport::Builder report, std::uint64_t start, std::uint64_t pushNs);
  kj::Promise<void> resumeSourceAfterFailedSwitch(const std::string& source, const std::string& target,
                                                  const std::string& why);
  /// Grants `target` a new lease epoch and has it resume the VM; fills the
  /// report's resume part.
  kj::Promise<void> activateOn(const std::string& target, wire::SwitchReport::Builder report, std::uint64_t start);
  /// The VM was parked and `target` did not resume it: the lease goes back.
  kj::Promise<void> leaveParkedIfNotResumed(const std::string& target, kj::Exception&& e, const char* where);
  /// The failover itself (switchTo with force, its checks passed).
  kj::Promise<void> failOver(const std::string& target, wire::SwitchReport::Builder report);
  /// The newest resumable point; throws Error naming the VM when there is none.
  std::uint64_t resumablePointToFailOverTo() const;
  /// Its first part, in the chain's order: the new lease epoch, the chain cut
  /// back to the resumable point (returned), the report's failover part.
  std::uint64_t fenceForFailover(const std::string& target, wire::SwitchReport::Builder report);
  /// Brings every online device past `point` back to the chain (a resync).
  kj::Promise<void> rollBackDevices(std::uint64_t point);
  /// Queues a resync of device `id` (registration `connection`) on its
  /// forwarding chain; forwarding stops until it is done. Resolves when done.
  kj::Promise<void> resyncDevice(const std::string& id, std::uint64_t connection, std::string why);
  /// The resync itself, one at a time: the device's unit hashes, the chain's
  /// image materialized on a worker thread, the differing units sent; if that
  /// fails, the device drops its image and starts over from the base.
  kj::Promise<void> resyncNow(std::string id, std::uint64_t connection, std::string why);
  /// Builds the resync checkpoint for hashes `ram`/`disk` of an image at `from`, off this thread.
  kj::Promise<std::shared_ptr<capnp::MallocMessageBuilder>> buildResyncOffThread(std::uint64_t from,
                                                                         std::vector<std::uint64_t> ram,
                                                                         std::vector<std::uint64_t> disk);
  kj::Promise<void> finishResync(std::string id, std::uint64_t connection, kj::Promise<std::uint64_t> applied);
  /// push()'s checks of a checkpoint (content, lease, place in the chain,
  /// quotas), which throw Error to refuse it; the sequence when the chain
  /// holds it already (a push sent again after its answer was lost).
  std::optional<std::uint64_t> checkPush(const std::string& id, wire::Checkpoint::Reader checkpoint);
  /// After device `id`'s checkpoint became the head: the VM's state, the
  /// forwarding to the other devices, compaction.
  void recordPush(const std::string& id);
  /// pushAsync() once it may go: checked, written on a worker, recorded.
  kj::Promise<std::uint64_t> storePush(const std::string& id, std::shared_ptr<CheckpointStore::PendingAppend> pending);
  /// Runs `step` after every step queued before it has finished (whatever
  /// its outcome): the changes of the chain, one at a time.
  kj::Promise<std::uint64_t> inStoreOrder(kj::Function<kj::Promise<std::uint64_t>()> step);
  /// Nanoseconds since the lease holder last renewed its lease.
  std::uint64_t holderSilentNs() const;
  /// Wall-clock creation time of the resumable point (0: unknown).
  std::uint64_t resumablePointCreatedNs();
  /// Notes the kind and origin of the newest checkpoint (`parked()`).
  void noteHead(wire::Checkpoint::Reader head);
  /// Saves the state (and where every device is) now, durably.
  void persist();
  /// Saves the state (and where every device is) on a store worker: for
  /// what nothing waits on (persist() for what must be durable first).
  void persistLater();
  /// Runs the removal of what a fold or prune replaced on a store worker
  /// (here, without a timer: no event loop to come back to).
  void runCleanup(std::function<void()> job);
  /// Saves where the devices are within kAppliedFlushDelay (at once without a timer).
  void persistAppliedSoon();
  static constexpr auto kAppliedFlushDelay = 5 * kj::SECONDS;
  void forwardUpTo(DeviceEntry& entry, std::uint64_t sequence);
  kj::Promise<void> drained(DeviceEntry& entry);
  /// Brings device `id` (registration `connection`) from its applied sequence
  /// up to `to`: one merged catch-up when it misses two or more checkpoints and
  /// they can be merged, else one checkpoint at a time.
  kj::Promise<void> catchUp(std::string id, std::uint64_t connection, std::uint64_t to);
  /// Sends one checkpoint (stored or merged) to the device and records the result.
  kj::Promise<void> sendApply(std::string id, std::uint64_t connection, wire::Checkpoint::Reader checkpoint);

  /// Starts compaction when the chain after the base passed a limit (or,
  /// `now`, whatever the limits): a prune under Orig (at once), a fold on a
  /// worker thread under Prev.
  void maybeCompact(wire::Policy policy, bool now = false);
  /// The fold ended (done, failed or cancelled): its slot goes back.
  void foldDone();
  /// Tells the metrics (if any) where the devices stand, the lease epoch and
  /// the resumable point.
  void publishMetrics();

  std::shared_ptr<spdlog::logger> log_ = spdlog::default_logger();  // names the VM once setIdentity() did
  CheckpointStore store_;
  std::string name_;   // the name the VM was created under ("": any, until the first full checkpoint)
  std::string label_;  // "USER/NAME"
  CompactionLimits limits_;
  PushAdmission admitPush_;
  std::shared_ptr<ServerBudget> pushSlots_;
  std::shared_ptr<ServerBudget> foldSlots_;
  bool waitingForFold_ = false;  // a fold is due and waits for a slot (logged once)
  AuditLog* audit_ = nullptr;
  std::shared_ptr<ServerMetrics> metrics_;
  std::thread compactor_;
  std::atomic<bool> cancelCompaction_{false};
  bool compacting_ = false;
  std::uint64_t retryCompactionAt_ = 0;      // after a failed fold: not before this head
  kj::Maybe<kj::Promise<void>> compaction_;  // the fold's completion on this thread
  std::thread resyncer_;                     // builds one resync checkpoint at a time
  std::atomic<bool> cancelResync_{false};
  kj::Maybe<kj::ForkedPromise<void>> resyncs_;  // resyncs, one after the other
  std::uint64_t resyncCount_ = 0;               // names each resync's scratch directory
  ServerState state_;
  std::map<std::string, std::unique_ptr<DeviceEntry>> devices_;
  std::uint64_t connections_ = 0;
  std::uint64_t storedBytes_ = 0;  // checkpoint bytes stored since start, for status
  bool switching_ = false;
  kj::Timer* timer_;
  std::chrono::milliseconds leaseTimeout_{30000};
  std::uint64_t lastRenewalNs_ = 0;  // when the holder last renewed (or the server started)
  std::string fenced_;               // a holder whose credential was revoked
  struct PendingPause {
    std::string holder;       // who paused for a switch or a park before the server stopped
    std::string target;       // the switch's target ("" for a park)
    std::uint64_t since = 0;  // lastRenewalNs_ then: a renewal changes it
    std::uint64_t backNs = 0; // when the holder was first seen registered again
  };
  std::optional<PendingPause> pendingPause_;
  kj::Maybe<kj::Promise<void>> pendingPauseCheck_;
  std::pair<std::uint64_t, std::uint64_t> resumableCreated_{0, 0};  // (sequence, its createdUnixNs)
  bool headIsFinal_ = false;  // the newest checkpoint is a final one
  bool appliedUnsaved_ = false;                  // a device's position changed since the last save
  bool flushScheduled_ = false;                  // appliedFlush_ has not run yet
  kj::Maybe<kj::Promise<void>> appliedFlush_;    // the save persistAppliedSoon() scheduled
  kj::Maybe<kj::Promise<void>> appliedSave_;     // persistLater()'s save on a worker
  kj::Maybe<kj::ForkedPromise<void>> storeTail_;  // the last change of the chain queued (inStoreOrder)
  kj::Canceler storeCanceler_;                    // every store step this object waits on
  std::shared_ptr<void> lifetime_ = std::make_shared<int>(0);  // see lifetime()
  kj::Maybe<kj::Promise<void>> compactionCleanup_;  // removing what a fold or prune replaced, on a worker
  std::string headOrigin_;    // the device that pushed it
};

}  // namespace vmsync
