// The study's measure of compression: bytes and CPU of every checkpoint
// under none, lz4 and zstd levels, encoded as a device encodes them (lz4 per
// chunk; zstd over blobs of an encoding task's payloads).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "checkpoint/compression_choice.h"

namespace vmsync {

/// The choices the study compares.
std::vector<PayloadCompression> studyCompressionChoices();

/// Payload bytes and encoding CPU of one checkpoint per choice (same order as
/// studyCompressionChoices()), under Dirty (whole units) and Diff (XOR runs).
struct ChoiceCosts {
  std::vector<double> dirtyBytes, diffBytes;
  std::vector<double> dirtyCpuMs, diffCpuMs;
};

/// A unit's bytes by index.
using UnitReader = std::function<std::span<const std::byte>(std::uint64_t)>;

/// Encodes the units whose hash differs from the reference's, as a checkpoint
/// would carry them, once per choice.
ChoiceCosts measureChoices(const UnitReader& live, const std::vector<std::uint64_t>& liveHashes,
                           const UnitReader& reference, const std::vector<std::uint64_t>& referenceHashes);

/// Totals of one run: per interval, per policy, per choice, the session's
/// bytes (every checkpoint and the final one) and CPU.
struct CompressionTally {
  struct Total {
    std::vector<double> bytes, cpuMs;
    std::uint64_t checkpoints = 0;
  };
  std::map<std::uint32_t, std::map<std::string, Total>> byInterval;  // interval -> policy -> totals

  /// Adds one checkpoint of interval `k` measured against the previous
  /// (`prev`) and against the base (`orig`).
  void add(std::uint32_t k, const ChoiceCosts& prev, const ChoiceCosts& orig);
};

/// The report's section: per interval and policy, MiB and share of Incr Dirty
/// (raw, `incrDirty` per interval and run) and CPU per checkpoint for each
/// choice, median over runs.
void writeCompressionSection(std::ostream& md, const std::vector<CompressionTally>& runs,
                             const std::vector<std::map<std::uint32_t, double>>& incrDirty);

}  // namespace vmsync
