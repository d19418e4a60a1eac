// One checkpoint's identity, whoever holds it: the server recognises a push
// re-sent after a cut connection by it, and the device logs it with each
// acknowledgement so that an outside checker can find what it was promised.
#pragma once

#include <array>
#include <cstddef>
#include <string>

#include "vmsync.capnp.h"

namespace vmsync {

/// 128-bit digest (xxh3) of a checkpoint's canonical Cap'n Proto encoding:
/// every field, so equal digests mean the same sequence, epoch, base, kind
/// and content, however the message was laid out on the wire or on disk.
using CheckpointDigest = std::array<std::byte, 16>;
CheckpointDigest checkpointDigest(wire::Checkpoint::Reader checkpoint);

/// "lease epoch E, checkpoint digest D": how a device logs what it pushed
/// when the server acknowledges it (outside checkers parse these words).
std::string describeIdentity(wire::Checkpoint::Reader checkpoint);

}  // namespace vmsync
