// Applies checkpoints to a device's local image (standby side).
#pragma once

#include <cstdint>

#include "image_file.h"
#include "vmsync.capnp.h"

namespace vmsync {

/// What applying one checkpoint did.
struct ApplyStats {
  std::uint64_t memoryUnits = 0;
  std::uint64_t diskUnits = 0;
};

/// Applies `checkpoint` to `ram` and `disk`. Every chunk is checked and decoded
/// before the first byte is written, so a malformed checkpoint is rejected whole
/// (Error naming the problem) and the image is left as it was.
ApplyStats applyCheckpoint(wire::Checkpoint::Reader checkpoint, ImageFile& ram, ImageFile& disk);

}  // namespace vmsync
