// Merging a run of consecutive checkpoints into one catch-up checkpoint.
#pragma once

#include <string>
#include <vector>

#include "vmsync.capnp.h"

namespace vmsync {

/// Merges `run` (consecutive checkpoints, each based on the previous one) into
/// `out`: baseSequence of the first, sequence of the last, and for every
/// page/block only the newest chunk. When the last is final its device state
/// and digest are kept and the merge is final; when the first is full the
/// merge is full (with its spec). Only self-contained chunks (whole, zero,
/// either compressed or not) are merged, a sameAs chunk standing for the chunk
/// it names: an xorDiff chunk depends on the receiver's bytes, so such a run is
/// refused and the caller sends it one by one. A reference chunk stands for
/// the run's chunk that wrote its source before its checkpoint, whose hash
/// must be the reference's (else the run is refused, naming the unit); when
/// nothing in the run wrote the source, it stays a reference to the image
/// before the merge (in a run from a full checkpoint: a zero unit). When any checkpoint of the run
/// carried zstd frames, the merge's payloads travel in zstd frames too (about
/// 1 MiB of payload each, level kDefaultZstdLevel); else in their chunks.
/// Returns the refusal reason, empty on success.
std::string mergeCheckpoints(const std::vector<wire::Checkpoint::Reader>& run, wire::Checkpoint::Builder out);

}  // namespace vmsync
