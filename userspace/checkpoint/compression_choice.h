// How a checkpoint's payloads are compressed, and the choice of it from the
// link rate and the CPU each choice costs.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "vmsync.capnp.h"

namespace vmsync {

/// How payloads are compressed: none; lz4 per chunk; or zstd at `level` over
/// each blob (many units' payloads in one frame, the chunks themselves left
/// uncompressed inside it).
struct PayloadCompression {
  wire::Compression kind = wire::Compression::LZ4;
  int level = 0;  // zstd only

  /// "none", "lz4" or "zstd:LEVEL".
  std::string name() const;
  bool operator==(const PayloadCompression&) const = default;
};

/// The zstd level `--compression zstd` means without one.
inline constexpr int kDefaultZstdLevel = 3;

/// What `--compression` asked for: a fixed choice, or `auto` (chosen from the
/// measured link rate by a CompressionSelector).
struct CompressionSetting {
  bool automatic = true;
  PayloadCompression fixed;  // when not automatic

  /// "auto", or the fixed choice's name.
  std::string name() const;
};

/// Parses "auto", "none", "lz4", "zstd" or "zstd:LEVEL" (LEVEL 1..22). Throws
/// Error naming what was wrong.
CompressionSetting parseCompressionSetting(std::string_view text);

/// Picks the compression for the next checkpoint from the rate pushes reach
/// the server at and what each choice costs in CPU. A choice is affordable
/// when compressing a checkpoint takes at most `cpuShare` of the time its
/// compressed bytes take on the link:
///
///     rawBytes / speed(c)  <=  cpuShare * rawBytes * ratio(c) / linkRate
///
/// and the affordable one with the smallest ratio wins; lz4 when none is (a
/// fast link). speed (bytes of changed units encoded per CPU second) and
/// ratio (wire bytes per byte of changed units) start from rough figures for guest pages (kPriors in the .cc) and
/// follow what the checkpoints really cost: a choice that was used is
/// measured, the others are scaled by how far the measured ones are from
/// their priors (this CPU, this guest's data). Before any push, lz4.
class CompressionSelector {
 public:
  /// `candidates`: the choices, lz4 among them; empty: lz4, zstd:1, 3, 9 and 19.
  explicit CompressionSelector(std::vector<PayloadCompression> candidates = {}, double cpuShare = 0.25);

  /// A checkpoint was encoded with `used`: its changed units, `rawBytes` (4096
  /// each), became `wireBytes` of payload in `cpuSeconds` of CPU on all threads
  /// (diffs and compression). Speeds and ratios are per byte of changed units,
  /// so that every choice is measured against the same thing.
  void onEncoded(const PayloadCompression& used, std::uint64_t rawBytes, std::uint64_t wireBytes, double cpuSeconds);
  /// A push of `wireBytes` reached the server in `seconds`.
  void onPush(std::uint64_t wireBytes, double seconds);

  /// The choice for the next checkpoint.
  PayloadCompression choice() const;
  /// The measured link rate (0 before the first push).
  double linkBytesPerSecond() const { return linkRate_; }
  /// Why choice() is what it is, for the log: the link rate and, per
  /// candidate, its estimated speed, ratio and CPU share.
  std::string explain() const;

  /// Estimated raw bytes per CPU second and wire bytes per raw byte of `c`.
  double speed(const PayloadCompression& c) const;
  double ratio(const PayloadCompression& c) const;

 private:
  struct Candidate {
    PayloadCompression compression;
    double priorSpeed;
    double priorRatio;
    double speed = 0;  // measured (0: not yet)
    double ratio = 0;
  };
  const Candidate* find(const PayloadCompression& c) const;
  /// `c`'s prior for the figure `measured` (its own, or `priorIfNotCandidate`),
  /// scaled by the geometric mean of measured / prior over the candidates
  /// measured so far.
  double scaledPrior(const PayloadCompression& c, double Candidate::*measured, double Candidate::*prior,
                     double priorIfNotCandidate) const;

  std::vector<Candidate> candidates_;
  double cpuShare_;
  double linkRate_ = 0;
};

}  // namespace vmsync
