#include "lab/study_compression.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>

#include "base/units.h"
#include "checkpoint/blob_frames.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/chunk_codec.h"
#include "lab/machine_usage.h"

namespace vmsync {

namespace {

/// Bytes on the wire and CPU of `units` encoded by `encode` under `choice`:
/// lz4 per unit, or zstd over each task's payloads (encodeGrain() units, as
/// the device frames them).
struct Cost {
  double bytes = 0, cpuMs = 0;
};
Cost encodeAll(std::size_t units, const PayloadCompression& choice,
               const std::function<ChunkView(std::size_t, bool, std::span<std::byte>)>& encode) {
  const double start = threadCpuMs();
  const bool lz4 = choice.kind == wire::Compression::LZ4;
  const bool zstd = choice.kind == wire::Compression::ZSTD;
  const std::size_t grain = encodeGrain(units, choice);
  std::array<std::byte, kMaxPayload> room;
  std::vector<std::byte> blob, frame;
  Cost cost;
  auto flush = [&] {
    if (blob.empty()) return;
    frame.resize(zstdFrameBound(blob.size()));
    const std::size_t n = compressZstdFrame(blob, choice.level, frame);
    cost.bytes += static_cast<double>(n > 0 ? n : blob.size());
    blob.clear();
  };
  for (std::size_t k = 0; k < units; ++k) {
    if (zstd && k % grain == 0) flush();
    const ChunkView chunk = encode(k, lz4, room);
    if (zstd)
      blob.insert(blob.end(), chunk.data.begin(), chunk.data.end());
    else
      cost.bytes += static_cast<double>(chunk.data.size());
  }
  if (zstd) flush();
  cost.cpuMs = threadCpuMs() - start;
  return cost;
}

}  // namespace

std::vector<PayloadCompression> studyCompressionChoices() {
  return {{wire::Compression::NONE, 0},
          {wire::Compression::LZ4, 0},
          {wire::Compression::ZSTD, 1},
          {wire::Compression::ZSTD, 3},
          {wire::Compression::ZSTD, 9}};
}

ChoiceCosts measureChoices(const UnitReader& live, const std::vector<std::uint64_t>& liveHashes,
                           const UnitReader& reference, const std::vector<std::uint64_t>& referenceHashes) {
  std::vector<std::uint64_t> changed;
  for (std::uint64_t i = 0; i < liveHashes.size(); ++i)
    if (liveHashes[i] != referenceHashes[i]) changed.push_back(i);
  ChoiceCosts costs;
  for (const PayloadCompression& choice : studyCompressionChoices()) {
    const Cost dirty = encodeAll(changed.size(), choice, [&](std::size_t k, bool lz4, std::span<std::byte> room) {
      return encodeWholeInto(changed[k], live(changed[k]), lz4, room);
    });
    const Cost diff = encodeAll(changed.size(), choice, [&](std::size_t k, bool lz4, std::span<std::byte> room) {
      return encodeDiffInto(changed[k], live(changed[k]), reference(changed[k]), lz4, room);
    });
    costs.dirtyBytes.push_back(dirty.bytes);
    costs.dirtyCpuMs.push_back(dirty.cpuMs);
    costs.diffBytes.push_back(diff.bytes);
    costs.diffCpuMs.push_back(diff.cpuMs);
  }
  return costs;
}

void CompressionTally::add(std::uint32_t k, const ChoiceCosts& prev, const ChoiceCosts& orig) {
  auto& policies = byInterval[k];
  auto addTo = [](Total& total, const std::vector<double>& bytes, const std::vector<double>& cpuMs) {
    total.bytes.resize(bytes.size());
    total.cpuMs.resize(cpuMs.size());
    for (std::size_t c = 0; c < bytes.size(); ++c) {
      total.bytes[c] += bytes[c];
      total.cpuMs[c] += cpuMs[c];
    }
    ++total.checkpoints;
  };
  addTo(policies["dirty-prev"], prev.dirtyBytes, prev.dirtyCpuMs);
  addTo(policies["diff-prev"], prev.diffBytes, prev.diffCpuMs);
  addTo(policies["dirty-orig"], orig.dirtyBytes, orig.dirtyCpuMs);
  addTo(policies["diff-orig"], orig.diffBytes, orig.diffCpuMs);
}

namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

}  // namespace

void writeCompressionSection(std::ostream& md, const std::vector<CompressionTally>& runs,
                             const std::vector<std::map<std::uint32_t, double>>& incrDirty) {
  if (runs.empty()) return;
  const auto choices = studyCompressionChoices();
  md << "\n## Compression per policy\n\n"
     << "Session traffic (every checkpoint at the interval and the final one) and the CPU its encoding takes, "
     << "per policy and compression: lz4 per chunk; zstd over blobs of each encoding task's payloads, one frame "
     << "each, as a device sends them. Share: of Incr Dirty (whole changed units, uncompressed). CPU: encoding "
     << "and compressing on one thread, per checkpoint (harvest excluded). Median over runs.\n";
  for (const auto& [k, policies] : runs.front().byInterval) {
    md << "\n### Interval " << k << " s\n\n| policy |";
    for (const auto& c : choices) md << ' ' << c.name() << " |";
    md << "\n|---|";
    for (std::size_t c = 0; c < choices.size(); ++c) md << "---|";
    md << '\n';
    for (const char* policy : {"dirty-prev", "diff-prev", "dirty-orig", "diff-orig"}) {
      if (!policies.contains(policy)) continue;
      md << "| " << policy << " |";
      for (std::size_t c = 0; c < choices.size(); ++c) {
        std::vector<double> bytes, share, cpu;
        for (std::size_t r = 0; r < runs.size(); ++r) {
          const auto& total = runs[r].byInterval.at(k).at(policy);
          bytes.push_back(total.bytes[c]);
          const double raw = incrDirty[r].contains(k) ? incrDirty[r].at(k) : 0;
          share.push_back(raw > 0 ? total.bytes[c] / raw : 0);
          cpu.push_back(total.checkpoints ? total.cpuMs[c] / static_cast<double>(total.checkpoints) : 0);
        }
        md << fmt::format(" {:.2f} MiB, {:.3f}, {:.1f} ms |", median(bytes) / (1 << 20), median(share), median(cpu));
      }
      md << '\n';
    }
  }
  md << "\nEach cell: session MiB, share of Incr Dirty, CPU per checkpoint.\n";
}

}  // namespace vmsync
