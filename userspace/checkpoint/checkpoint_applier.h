// Applies checkpoints to a device's local image (standby side).
#pragma once

#include <cstdint>
#include <vector>

#include "vmm/image_file.h"
#include "vmsync.capnp.h"

namespace vmsync {

/// What applying one checkpoint did.
struct ApplyStats {
  std::uint64_t memoryUnits = 0;
  std::uint64_t diskUnits = 0;
  std::uint64_t restoredUnits = 0;  // Orig: units returned to the base
  /// Every unit written (the checkpoint's and, under Orig, those restored),
  /// for a caller that keeps per-unit hashes current.
  std::vector<std::uint64_t> ramWritten;
  std::vector<std::uint64_t> diskWritten;
};

/// The base image under an Orig policy (nullptr members otherwise).
struct BaseImage {
  const ImageFile* ram = nullptr;
  const ImageFile* disk = nullptr;
};

/// Reads every field of `checkpoint` as the schema declares it. Throws Error
/// when one is of another kind (a list where text is declared, a pointer out
/// of the message), or when any pointer, named by the schema or not, leaves
/// the message: such a message would otherwise fail with a kj::Exception
/// wherever that field is first read.
void checkWellFormed(wire::Checkpoint::Reader checkpoint);

/// Checks that `checkpoint` is well-formed (checkWellFormed) and every chunk of it for images of `memoryUnits` and
/// `diskUnits` units, writing nothing: indexes in range and each at most once,
/// references only backwards, every payload decoding to exactly one unit
/// (XOR-diffs are decoded against zeros, which checks their structure). Throws
/// Error naming the first problem. The server runs it on every push.
void validateCheckpoint(wire::Checkpoint::Reader checkpoint, std::uint64_t memoryUnits, std::uint64_t diskUnits);

/// Applies `checkpoint` to `ram` and `disk`. Every chunk is checked and decoded
/// before the first byte is written, so a malformed checkpoint is rejected whole
/// (Error naming the problem) and the image is left as it was. Under an Orig
/// policy (other than the full checkpoint) XOR-diffs decode against `base`, and
/// units the checkpoint leaves out are returned to the base.
ApplyStats applyCheckpoint(wire::Checkpoint::Reader checkpoint, ImageFile& ram, ImageFile& disk,
                           BaseImage base = {});

}  // namespace vmsync
