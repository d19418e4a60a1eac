// Turns harvested candidates into checkpoint chunks and remembers what was shipped.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "chunk_codec.h"
#include "dirty_source.h"
#include "image_file.h"

namespace vmsync {

/// Parses "dirty-prev", "diff-prev", "dirty-orig", "diff-orig".
wire::Policy parsePolicy(std::string_view name);
/// The command-line name of a policy.
std::string policyName(wire::Policy policy);
/// True for the policies that ship changed bytes only.
bool isDiffPolicy(wire::Policy policy);
/// True for the policies measured against the original (base) image.
bool isOrigPolicy(wire::Policy policy);

/// One image's changes, ready to ship, and what shipping them will make the
/// receiver's image look like.
struct ImageDelta {
  std::vector<EncodedUnit> units;                              // chunks, by ascending index
  std::vector<std::pair<std::uint64_t, std::uint64_t>> hashes; // (index, hash of the shipped bytes)
  std::vector<std::byte> raw;                                  // shipped bytes, 4096 per entry of `hashes`
  std::uint64_t examined = 0;                                  // units hashed in place
  std::uint64_t rawBytes = 0;                                  // changed units x 4096
  std::uint64_t encodedBytes = 0;                              // sum of chunk payloads
};

/// Tracks one image (guest RAM or disk) for the active device: the hash of what
/// the receiver holds for every unit, and units whose shipment is not yet
/// acknowledged. Follows the pre-copy rules: candidates come from a source that
/// has already reset its dirty set; each changed unit is copied, the copy is
/// hashed, and that copy is what ships.
///
/// Policies: Prev measures each unit against the receiver's current copy; Orig
/// against the base image (set with setBase() once the full checkpoint is
/// acknowledged), so each checkpoint carries every unit that differs from the
/// base and a receiver needs the base plus the latest checkpoint only. Diff
/// keeps a copy of the reference bytes (receiver copy for Prev, the base for
/// Orig) to encode XOR-diffs.
class ImageTracker {
 public:
  /// `receiverHashes`: hash of every unit as the receiver has it.
  /// `receiverBytes`: for Diff Prev, the receiver's bytes (empty: all zero).
  ImageTracker(const ImageFile& image, std::vector<std::uint64_t> receiverHashes, wire::Policy policy, bool compress,
               std::vector<std::byte> receiverBytes = {});

  /// Orig policies: from now on measure against `base` (which must outlive the
  /// tracker).
  void setBase(const ImageFile& base);

  /// Collects the units among `candidates` (plus any unacknowledged ones) that
  /// the receiver must be sent under the policy.
  ImageDelta collect(const DirtyUnits& candidates);

  /// The receiver acknowledged `delta`: it now holds those bytes.
  void acknowledge(const ImageDelta& delta);

  /// Shipping `delta` failed: its units are candidates again next time, even if
  /// the source does not report them again.
  void retryLater(const ImageDelta& delta);

  /// Hashes of what the receiver holds, per unit.
  const std::vector<std::uint64_t>& receiverHashes() const { return receiverHashes_; }
  /// Hashes the receiver will hold once `delta` is acknowledged.
  std::vector<std::uint64_t> hashesAfter(const ImageDelta& delta) const;
  /// Bytes of reference copies this tracker keeps (the policy's space overhead).
  std::uint64_t referenceBytes() const { return receiverBytes_.size(); }

 private:
  void consider(std::uint64_t index, ImageDelta& delta, std::map<std::uint64_t, std::uint32_t>& byHash);
  bool origActive() const { return base_ != nullptr; }

  const ImageFile& image_;
  wire::Policy policy_;
  bool compress_;
  std::vector<std::uint64_t> receiverHashes_;
  std::vector<std::byte> receiverBytes_;        // Diff Prev only
  const ImageFile* base_ = nullptr;             // Orig, once the base exists
  std::vector<std::uint64_t> baseHashes_;       // Orig
  std::set<std::uint64_t> sinceBase_;           // Orig: units reported since the base
  std::set<std::uint64_t> unacknowledged_;
};

}  // namespace vmsync
