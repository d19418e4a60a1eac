// The server's durable state: the checkpoint chain and the lease/device table.
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>

#include <cstdint>
#include <map>
#include <string>

#include "vmsync.capnp.h"

namespace vmsync {

/// A stored checkpoint, read back as a flat Cap'n Proto message.
class StoredCheckpoint {
 public:
  explicit StoredCheckpoint(kj::Array<capnp::word> words);
  wire::Checkpoint::Reader reader() { return message_.getRoot<wire::Checkpoint>(); }
  std::uint64_t bytes() const { return words_.size() * sizeof(capnp::word); }

 private:
  kj::Array<capnp::word> words_;
  capnp::FlatArrayMessageReader message_;
};

/// Lease and device table, persisted beside the chain.
struct ServerState {
  std::string vmId;
  std::uint64_t epoch = 0;
  std::string holder;                                  // empty: no active device
  std::map<std::string, std::uint64_t> appliedByDevice; // every device ever registered
};

/// The data directory: one file per checkpoint and a state file, each written
/// to a temporary name, fsynced, renamed into place and the directory fsynced,
/// so after a crash every file is whole or absent.
class CheckpointStore {
 public:
  explicit CheckpointStore(std::string dataDir);

  std::uint64_t head() const { return head_; }
  const ServerState& state() const { return state_; }

  /// Stores `checkpoint` as sequence head()+1; returns once it is durable.
  void append(wire::Checkpoint::Reader checkpoint);
  /// Reads a stored checkpoint. Throws Error if it is missing or damaged.
  kj::Own<StoredCheckpoint> read(std::uint64_t sequence) const;
  /// Replaces and persists the state.
  void saveState(const ServerState& state);

 private:
  std::string checkpointPath(std::uint64_t sequence) const;

  std::string dir_;
  std::uint64_t head_ = 0;
  ServerState state_;
};

}  // namespace vmsync
