// Small checkpoints for the server's unit tests.
#pragma once

#include <capnp/message.h>
#include <kj/memory.h>

#include <algorithm>
#include <cstdint>

#include "base/units.h"
#include "vmsync.capnp.h"

namespace vmsync {

/// A checkpoint of VM "vm" from device A, on top of sequence - 1: 1 is full
/// (with a spec of 16 units of RAM and of disk), the others `kind`. Its one
/// memory chunk is unit `sequence`, every byte `sequence`.
inline kj::Own<capnp::MallocMessageBuilder> testCheckpoint(
    std::uint64_t sequence, std::uint64_t epoch, wire::CheckpointKind kind = wire::CheckpointKind::INCREMENTAL) {
  auto message = kj::heap<capnp::MallocMessageBuilder>();
  auto root = message->initRoot<wire::Checkpoint>();
  root.setVmId("vm");
  root.setEpoch(epoch);
  root.setSequence(sequence);
  root.setBaseSequence(sequence - 1);
  root.setOrigin("A");
  root.setKind(sequence == 1 ? wire::CheckpointKind::FULL : kind);
  if (sequence == 1) {
    auto spec = root.initSpec();
    spec.setVmId("vm");
    spec.setMemoryBytes(16 * kUnitSize);  // the server checks every chunk against the VM's sizes
    spec.setDiskBytes(16 * kUnitSize);
  }
  auto memory = root.initMemory(1);
  memory[0].setIndex(sequence);
  memory[0].setEncoding(wire::ChunkEncoding::WHOLE);
  auto data = memory[0].initData(kUnitSize);
  std::fill(data.begin(), data.end(), static_cast<std::uint8_t>(sequence));
  return message;
}

}  // namespace vmsync
