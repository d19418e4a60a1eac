// Folding a Prev chain into a new base, off the server's event loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace vmsync {

/// What a fold produced.
struct FoldStats {
  std::uint64_t sequence = 0;      // the new base's sequence
  std::uint64_t folded = 0;        // checkpoints folded in, the old base included
  std::uint64_t memoryUnits = 0;   // non-zero units in the new base
  std::uint64_t diskUnits = 0;
  std::uint64_t bytes = 0;         // size of the new base's record
};

/// Folds the chain in `paths` (a full checkpoint, then each checkpoint after
/// it in order, all under a Prev policy) into one full checkpoint at the last
/// one's sequence, written durably as a record to `out`. The image is
/// materialized in `scratchDir` (created, and removed afterwards) by applying
/// every checkpoint exactly as a standby would. Reads only the files named, so
/// it can run on another thread while the chain grows. Throws Error naming
/// what failed; stops with an Error when `cancel` becomes true.
FoldStats foldChain(const std::vector<std::string>& paths, const std::string& scratchDir, const std::string& out,
                    const std::atomic<bool>& cancel);

}  // namespace vmsync
