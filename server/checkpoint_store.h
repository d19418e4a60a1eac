// The server's durable state: the checkpoint chain and the lease/device table.
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>
#include <kj/refcount.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "vmsync.capnp.h"

namespace vmsync {

/// A stored checkpoint, read back as a flat Cap'n Proto message. Shared (by
/// reference count) between the devices it is being sent to.
class StoredCheckpoint : public kj::Refcounted {
 public:
  explicit StoredCheckpoint(kj::Array<capnp::word> words);
  wire::Checkpoint::Reader reader() { return message_.getRoot<wire::Checkpoint>(); }
  std::uint64_t bytes() const { return words_.size() * sizeof(capnp::word); }
  /// The flat message, as a record holds it.
  kj::ArrayPtr<const kj::byte> asBytes() const { return words_.asBytes(); }

 private:
  kj::Array<capnp::word> words_;
  capnp::FlatArrayMessageReader message_;
};

/// Lease and device table, persisted beside the chain.
struct ServerState {
  std::string vmId;
  std::uint64_t epoch = 0;
  std::string holder;                                  // empty: no active device
  std::string owner;                                   // user whose VM this is; empty: not claimed yet
  std::map<std::string, std::uint64_t> appliedByDevice; // every device ever registered
  std::uint64_t abandonedAfter = 0;                    // last failover: it resumed from this checkpoint
  std::uint64_t abandonedUpTo = 0;                     //   and abandoned those after it, up to this one
  std::uint64_t abandonedTotal = 0;                    // checkpoints abandoned by every failover
  // Every failover: (the checkpoint it resumed from, the lease epoch it began).
  // A checkpoint past the first under an older epoch is one it abandoned.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> failovers;
  // A switch was cut short with the VM parked at a final checkpoint and
  // nobody holding the lease (the server restarted before the target was
  // activated, or the source it meant to resume on was offline): the device
  // to resume the VM on when it registers. Empty: none.
  std::string resumeOn;
  // What the holder was asked to pause for, recorded before the request:
  // "switch:TARGET" or "park"; cleared with the record of the outcome. A
  // power cut can take that record (the holder's final checkpoint stored,
  // its lease given back): a start that finds it set learns where the VM
  // was to go. One left by a switch that failed is harmless: it is acted on
  // only when the VM is parked, or the head is the holder's own final
  // checkpoint under the current lease.
  std::string pauseIntent;
};

/// The data directory: the base (a full checkpoint), then the checkpoints
/// after it, one file each, plus a state file. Every file is written to a
/// temporary name, fsynced, renamed into place and the directory fsynced, so
/// after a crash every file is whole or absent.
///
/// The chain is base() followed by first()..head(). At the start the base is
/// checkpoint 1 as the first device pushed it. Compaction moves it forward in
/// one of two ways, each committed by a single rename or removal:
///  - a fold (Prev policies): the image at sequence K, materialized from the
///    base and the checkpoints up to K, is stored as a new full checkpoint
///    "K.base"; everything at or below K is then removed;
///  - a prune (Orig policies, whose checkpoints need only the base): the
///    checkpoints between the base and the newest one are removed; the base
///    stays. A gap is allowed only before an Orig checkpoint.
/// What opening a data directory may do about damage.
struct StoreRecovery {
  /// A head record that fails its check is set aside as "N.ckpt.damaged" and
  /// the chain goes on from the checkpoint before it. Without this, opening
  /// refuses: every N.ckpt was committed (written, fsynced, then renamed into
  /// place) before its push was acknowledged, so a damaged one may be an
  /// acknowledged checkpoint, and dropping it must be the operator's choice.
  bool setAsideDamagedHead = false;
};

class CheckpointStore {
 public:
  explicit CheckpointStore(std::string dataDir, StoreRecovery recovery = {});

  const std::string& dir() const { return dir_; }
  std::uint64_t head() const { return head_; }
  /// Sequence of the base (0 while the chain is empty).
  std::uint64_t base() const { return base_; }
  /// Oldest stored checkpoint after the base (head()+1 when there is none).
  std::uint64_t first() const { return bytes_.empty() ? head_ + 1 : bytes_.begin()->first; }
  /// Bytes of the stored checkpoints after the base.
  std::uint64_t bytesAfterBase() const;
  /// Bytes of the base's file (0 while the chain is empty).
  std::uint64_t baseBytes() const { return baseBytes_; }
  /// The VM's image sizes, from the base's spec (0 while the chain is empty).
  /// A fold keeps the spec, so they stay as the first full checkpoint set them.
  std::uint64_t memoryBytes() const { return memoryBytes_; }
  std::uint64_t diskBytes() const { return diskBytes_; }
  /// Number of stored checkpoints after the base.
  std::uint64_t countAfterBase() const { return bytes_.size(); }
  /// True when `sequence` can be read.
  bool stored(std::uint64_t sequence) const {
    return sequence != 0 && (sequence == base_ || bytes_.contains(sequence));
  }
  const ServerState& state() const { return state_; }

  /// Stores `checkpoint` as sequence head()+1; returns once it is durable.
  /// The same as copyForAppend(), placeAppend(), writeAppend() and
  /// commitAppend() in a row.
  void append(wire::Checkpoint::Reader checkpoint);
  /// A checkpoint on its way to becoming the head, copied out of the message
  /// it came in: checked, then written on another thread, after that message
  /// may be gone.
  struct PendingAppend {
    kj::Own<StoredCheckpoint> checkpoint;  // moved into the store when committed
    std::uint64_t sequence = 0;            // set by placeAppend()
    std::string path;
  };
  /// The copy (refused when above the record size limit).
  static std::shared_ptr<PendingAppend> copyForAppend(wire::Checkpoint::Reader checkpoint);
  /// Names it head()+1. Until it is committed nothing else may change the head.
  void placeAppend(PendingAppend& pending) const;
  /// Writes it durably to its path (committed by its rename, as every record
  /// is). Touches nothing else of the store: any thread may call it.
  static void writeAppend(const PendingAppend& pending);
  /// Test seam: when set, called on the writing thread with the path of each
  /// appended checkpoint before it is written (unit tests hold a write with it).
  static inline std::function<void(const std::string& path)> beforeAppendWriteForTests;
  /// Makes the written checkpoint the head. Throws Error when the head moved
  /// since placeAppend(), and then nothing changes.
  void commitAppend(PendingAppend& pending);
  /// Reads a stored checkpoint (the newest from memory). Throws Error if it
  /// is not stored or damaged.
  kj::Own<StoredCheckpoint> read(std::uint64_t sequence) const;
  /// Path of a stored checkpoint's file (for readers on other threads; the
  /// file stays until the next fold or prune commits).
  std::string pathOf(std::uint64_t sequence) const;
  /// Newest stored final checkpoint: where a failover resumes (0: none).
  std::uint64_t resumablePoint() const { return resumablePoint_; }
  /// A failover under lease `epoch`: moves the checkpoints after `sequence`
  /// out of the chain into abandoned/ (kept for audit), so the head becomes
  /// `sequence`. Returns how many were moved.
  std::uint64_t abandonAfter(std::uint64_t sequence, std::uint64_t epoch);
  /// Replaces and persists the state.
  void saveState(const ServerState& state);
  /// Replaces the state now; returns the job that persists it, for another
  /// thread. A save that was overtaken by a newer one (this way or by
  /// saveState()) writes nothing, so the file never goes back in time.
  std::function<void()> saveStateLater(const ServerState& state);

  /// Where a fold at `sequence` writes its new base before commitFold().
  std::string foldPath(std::uint64_t sequence) const;
  /// Makes the record at foldPath(`sequence`) (written whole and fsynced) the
  /// base, then removes what it replaces.
  void commitFold(std::uint64_t sequence);
  /// The same, but the files it replaces are removed by the job it returns,
  /// for another thread: the chain no longer names them, and a start removes
  /// what a crash left.
  std::function<void()> commitFoldLater(std::uint64_t sequence);
  /// Removes the checkpoints after the base and below `sequence`, which must
  /// be stored (Orig policies only: each checkpoint is measured against the
  /// base alone).
  void prune(std::uint64_t sequence);
  /// The same, the files removed by the job it returns (as commitFoldLater()).
  std::function<void()> pruneLater(std::uint64_t sequence);
  /// Scratch directory for compaction (emptied at start-up).
  std::string scratchDir() const { return dir_ + "/compaction"; }
  /// Scratch directory for resyncs (emptied at start-up).
  std::string resyncDir() const { return dir_ + "/resync"; }

 private:
  std::string checkpointPath(std::uint64_t sequence) const;
  static void removeQuietly(const std::string& path);
  /// The job that removes `paths` from the chain's directory and syncs it.
  std::function<void()> removal(std::vector<std::string> paths) const;
  /// At start: finishes moving the checkpoints a recorded failover abandoned
  /// when a crash stopped it halfway.
  void finishInterruptedFailover();
  /// Takes the VM's sizes from the base, read anyway when it is stored or verified.
  void noteBase(wire::Checkpoint::Reader base);
  /// state.json for `state`, numbered in the order the saves were asked for.
  struct StateFile {
    std::uint64_t generation = 0;
    std::string text;
  };
  StateFile stateFile(const ServerState& state);

  std::string dir_;
  std::uint64_t head_ = 0;
  std::uint64_t base_ = 0;
  bool foldedBase_ = false;  // the base is a "K.base" file, not checkpoint 1
  std::uint64_t resumablePoint_ = 0;  // newest final checkpoint
  std::uint64_t memoryBytes_ = 0;  // the VM's sizes, from the base's spec
  std::uint64_t diskBytes_ = 0;
  std::map<std::uint64_t, std::uint64_t> bytes_;  // stored checkpoints after the base: sequence -> bytes
  std::uint64_t baseBytes_ = 0;                   // the base's file
  // The newest checkpoint appended, kept in memory: every standby is sent it,
  // and each would otherwise read and verify the file again.
  std::string recentPath_;
  mutable kj::Maybe<kj::Own<StoredCheckpoint>> recent_;
  ServerState state_;
  std::uint64_t stateGeneration_ = 0;  // the newest save asked for
  // Saves may run on worker threads: one writes at a time, newest wins.
  struct StateWriter {
    std::mutex mutex;
    std::uint64_t written = 0;  // generation of the file on disk
  };
  std::shared_ptr<StateWriter> stateWriter_ = std::make_shared<StateWriter>();
};

}  // namespace vmsync
