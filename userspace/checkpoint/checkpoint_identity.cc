#include "checkpoint/checkpoint_identity.h"

#include <capnp/message.h>
#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>

#include "harvest/unit_hashes.h"

namespace vmsync {

CheckpointDigest checkpointDigest(wire::Checkpoint::Reader checkpoint) {
  // canonicalize() lays the message out in one segment, pointers in
  // pre-order and without padding, so two copies of one checkpoint give the same bytes.
  auto words = capnp::canonicalize(checkpoint);
  auto bytes = words.asBytes();
  XXH128_hash_t hash = XXH3_128bits(bytes.begin(), bytes.size());
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, hash);
  CheckpointDigest digest;
  std::memcpy(digest.data(), canonical.digest, digest.size());
  return digest;
}

std::string describeIdentity(wire::Checkpoint::Reader checkpoint) {
  return fmt::format("lease epoch {}, checkpoint digest {}", checkpoint.getEpoch(), toHex(checkpointDigest(checkpoint)));
}

}  // namespace vmsync
