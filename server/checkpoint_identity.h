// Recognising a checkpoint the server already holds, for pushes re-sent after
// a cut connection.
#pragma once

#include <array>
#include <cstddef>

#include "vmsync.capnp.h"

namespace vmsync {

/// 128-bit digest (xxh3) of a checkpoint's canonical Cap'n Proto encoding:
/// every field, so equal digests mean the same sequence, epoch, base, kind
/// and content, however the message was laid out on the wire or on disk.
using CheckpointDigest = std::array<std::byte, 16>;
CheckpointDigest checkpointDigest(wire::Checkpoint::Reader checkpoint);

}  // namespace vmsync
