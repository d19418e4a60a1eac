// The VMM's device state in a final checkpoint: compressed on the way, and
// checked and decoded where it is read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "vmsync.capnp.h"

namespace vmsync {

/// The largest device state a checkpoint may claim (QEMU's are well under a
/// few MiB without guest RAM); a larger claim is refused before memory is taken.
inline constexpr std::uint64_t kMaxDeviceStateBytes = 256ull << 20;

/// Sets `checkpoint`'s device state to `state`, lz4-compressed when that
/// makes it smaller (the stream is mostly zeros and repeated structure).
/// Returns the bytes it takes in the message.
std::uint64_t setDeviceState(wire::Checkpoint::Builder checkpoint, std::span<const std::byte> state);

/// The device state of `checkpoint`, decoded. Throws Error naming what is
/// wrong (an encoding it does not know, a size over the limit, a block that
/// does not decode to exactly the size it claims).
std::vector<std::byte> deviceStateOf(wire::Checkpoint::Reader checkpoint);

/// Copies the device state of `from`, as it is encoded, into `to`.
void copyDeviceState(wire::Checkpoint::Reader from, wire::Checkpoint::Builder to);

}  // namespace vmsync
