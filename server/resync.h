// Bringing a device's image back to the chain when it left it: after a
// failover abandoned checkpoints it had applied, or when its VM ran past its
// last checkpoint. The device sends the hash of every unit of its image; the
// server materializes the chain's image and sends only the units that differ.
#pragma once

#include <capnp/message.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace vmsync {

/// What a resync checkpoint holds.
struct ResyncStats {
  std::uint64_t sequence = 0;     // the chain's checkpoint it takes the image to
  std::uint64_t memoryUnits = 0;  // pages that differed
  std::uint64_t diskUnits = 0;    // blocks that differed
  bool final = false;             // carries device state and digest
};

/// Materializes the chain's image at the last checkpoint of `paths` in
/// `scratchDir` (created, and removed afterwards): `paths` holds a full
/// checkpoint, then under a Prev policy every checkpoint after it in order,
/// under an Orig policy at most one (measured against the full one). Compares
/// it unit by unit with `ramHashes` and `diskHashes` (hashUnit of every unit
/// of a device's image) and builds in `out` a resync checkpoint: sequence of
/// the last, baseSequence `from`, every differing unit whole (lz4 where it
/// helps) or zero, under a Prev policy so that a unit it leaves out keeps the
/// device's value. When the last is final the resync is final with its device
/// state and digest, which the materialized image must match. Reads only the
/// files named, so it can run on another thread. Throws Error naming what
/// failed; stops with an Error when `cancel` becomes true.
ResyncStats buildResync(const std::vector<std::string>& paths, const std::string& scratchDir, std::uint64_t from,
                        const std::vector<std::uint64_t>& ramHashes, const std::vector<std::uint64_t>& diskHashes,
                        capnp::MessageBuilder& out, const std::atomic<bool>& cancel);

}  // namespace vmsync
