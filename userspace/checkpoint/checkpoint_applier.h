// Applies checkpoints to a device's local image (standby side).
#pragma once

#include <cstdint>
#include <vector>

#include "base/error.h"
#include "vmm/image_file.h"
#include "vmsync.capnp.h"

namespace vmsync {

/// What applying one checkpoint did.
struct ApplyStats {
  std::uint64_t memoryUnits = 0;
  std::uint64_t diskUnits = 0;
  std::uint64_t restoredUnits = 0;  // Orig: units returned to the base
  std::uint64_t referenceUnits = 0; // units copied from another unit of the image (REFERENCE chunks)
  /// Every unit written (the checkpoint's and, under Orig, those restored),
  /// for a caller that keeps per-unit hashes current.
  std::vector<std::uint64_t> ramWritten;
  std::vector<std::uint64_t> diskWritten;
};

/// A REFERENCE chunk whose source unit does not hold the bytes the chunk names
/// (their hash differs): the image is not what the sender took it to be, so
/// the checkpoint is refused whole and nothing is written. The image needs
/// the server's units: a device marks it diverged, and the server resyncs it.
class ReferenceMismatch : public Error {
 public:
  using Error::Error;
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
/// sameAs references only backwards, REFERENCE chunks well-formed, naming a
/// unit in range and not in a full checkpoint, every payload decoding to exactly one unit
/// (XOR-diffs are decoded against zeros, which checks their structure). Throws
/// Error naming the first problem. The server runs it on every push.
void validateCheckpoint(wire::Checkpoint::Reader checkpoint, std::uint64_t memoryUnits, std::uint64_t diskUnits);

/// Applies `checkpoint` to `ram` and `disk`. Every chunk is checked and decoded
/// before the first byte is written, so a malformed checkpoint is rejected whole
/// (Error naming the problem) and the image is left as it was. Under an Orig
/// policy (other than the full checkpoint) XOR-diffs decode against `base`, and
/// units the checkpoint leaves out are returned to the base. A REFERENCE chunk
/// takes its source unit as the image held it before this checkpoint (every
/// source is read before anything is written), after checking that its bytes
/// hash to the chunk's hash; throws ReferenceMismatch, naming the unit, when
/// they do not.
ApplyStats applyCheckpoint(wire::Checkpoint::Reader checkpoint, ImageFile& ram, ImageFile& disk,
                           BaseImage base = {});

}  // namespace vmsync
