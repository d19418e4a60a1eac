#include "checkpoint_merge.h"

#include <fmt/format.h>

#include <array>
#include <map>

#include "checkpoint/blob_frames.h"
#include "checkpoint/chunk_codec.h"
#include "checkpoint/device_state_codec.h"
#include "checkpoint/compression_choice.h"
#include "base/error.h"
#include "base/units.h"
#include "harvest/unit_hashes.h"

namespace vmsync {

namespace {

bool selfContained(wire::Chunk::Reader chunk) {
  return chunk.getEncoding() == wire::ChunkEncoding::WHOLE || chunk.getEncoding() == wire::ChunkEncoding::ZERO;
}

/// A chunk to copy, and its payload (which may be in a blob of its checkpoint);
/// or a zero unit that no chunk of the run describes as such.
struct Newest {
  wire::Chunk::Reader chunk;
  std::span<const std::byte> payload;
  bool zero = false;  // write a ZERO chunk, whatever `chunk` is
};

/// The hash of the unit `newest` describes (whole or zero, lz4 or not).
std::uint64_t hashOf(const Newest& newest) {
  if (newest.zero) return zeroUnitHash();
  std::array<std::byte, kUnitSize> unit;
  decodeUnit(ChunkFields{newest.chunk.getIndex(), newest.chunk.getEncoding(), newest.chunk.getCompression(),
                         newest.chunk.getRawSize(), newest.payload},
             {}, unit);
  return hashUnit(unit);
}

/// What a REFERENCE chunk of the checkpoint at `sequence` stands for in the
/// merge, given the newest chunks of the run before that checkpoint: the
/// chunk that wrote its source in the run, if one did, checked against the
/// reference's hash; else the reference itself (the source is then as the
/// image before the merge holds it, which the receiver checks), or, in a run
/// from a full checkpoint, a zero unit. Returns the refusal reason, empty on
/// success.
std::string resolveReference(wire::Chunk::Reader chunk, std::span<const std::byte> payload, std::uint64_t sequence,
                             bool fromFull, const std::map<std::uint64_t, Newest>& before, Newest& out) {
  const UnitReference reference = referenceOf(chunk.getIndex(), chunk.getCompression(), payload);
  const auto source = before.find(reference.source);
  if (source == before.end()) {
    if (!fromFull) {
      out = Newest{chunk, payload};
      return {};
    }
    // The run starts from an empty image, and nothing wrote the source.
    if (reference.hash != zeroUnitHash())
      return fmt::format("checkpoint {}: unit {} refers to unit {}, which is zero in the merged image, but names "
                         "hash {:016x}",
                         sequence, chunk.getIndex(), reference.source, reference.hash);
    out = Newest{chunk, {}, true};
    return {};
  }
  const Newest& written = source->second;
  std::uint64_t found = 0;
  if (!written.zero && written.chunk.getEncoding() == wire::ChunkEncoding::REFERENCE)
    found = referenceOf(written.chunk.getIndex(), written.chunk.getCompression(), written.payload).hash;
  else
    found = hashOf(written);
  if (found != reference.hash)
    return fmt::format("checkpoint {}: unit {} refers to unit {} with hash {:016x}, but the run left it with hash "
                       "{:016x}",
                       sequence, chunk.getIndex(), reference.source, reference.hash, found);
  out = written;
  return {};
}

/// Newest chunk per unit index across the run, for one of the two images.
/// `blobs` holds each checkpoint's blobs (its zstd frames decompressed), in
/// the order of `run`: the payloads point into them.
template <typename ListOf>
std::string newestChunks(const std::vector<wire::Checkpoint::Reader>& run, const std::vector<PayloadBlobs>& runBlobs,
                         ListOf list, std::map<std::uint64_t, Newest>& newest) {
  const bool fromFull = run.front().getKind() == wire::CheckpointKind::FULL;
  std::vector<std::pair<std::uint64_t, Newest>> resolved;
  for (std::size_t c = 0; c < run.size(); ++c) {
    const auto checkpoint = run[c];
    const PayloadBlobs& blobs = runBlobs[c];
    auto chunks = list(checkpoint);
    // A reference names the image before its checkpoint: each chunk of this
    // checkpoint is resolved against the run before it, and only then added.
    resolved.clear();
    for (unsigned i = 0; i < chunks.size(); ++i) {
      auto chunk = chunks[i];
      // A duplicate within a checkpoint stands for the earlier chunk's bytes:
      // take that chunk (its index is set back when copying).
      if (chunk.getEncoding() == wire::ChunkEncoding::SAME_AS) {
        if (chunk.getSameAs() >= i)
          return fmt::format("checkpoint {} has a chunk referring forward", checkpoint.getSequence());
        chunk = chunks[chunk.getSameAs()];
      }
      const bool reference = chunk.getEncoding() == wire::ChunkEncoding::REFERENCE;
      if (!selfContained(chunk) && !reference)
        return fmt::format("checkpoint {} has a chunk for unit {} that refers to other bytes (encoding {})",
                           checkpoint.getSequence(), chunks[i].getIndex(), static_cast<int>(chunk.getEncoding()));
      try {
        Newest out{chunk, blobs.payload(chunk)};
        if (reference) {
          if (auto why = resolveReference(chunk, out.payload, checkpoint.getSequence(), fromFull, newest, out);
              !why.empty())
            return why;
        }
        resolved.emplace_back(chunks[i].getIndex(), out);
      } catch (const Error& e) {
        return fmt::format("checkpoint {}: {}", checkpoint.getSequence(), e.what());
      }
    }
    for (const auto& [index, out] : resolved) newest.insert_or_assign(index, out);
  }
  return {};
}

/// Raw bytes of payload per zstd frame of a merge: as a device's frames.
constexpr std::size_t kMergeFrameBytes = std::size_t{1} << 20;

/// Where the payloads of a merge go when its checkpoints came in zstd frames:
/// gathered into frames of about kMergeFrameBytes, each compressed again, so
/// that a catch-up is not larger than the pushes it replaces.
struct MergeFrames {
  std::vector<std::vector<std::byte>> raw;  // per blob, its chunks' payloads
};

/// Copies the chunks, each with its payload in itself; or with `frames`, in
/// the blobs gathered there.
void copyChunks(const std::map<std::uint64_t, Newest>& chunks, capnp::List<wire::Chunk>::Builder list,
                MergeFrames* frames) {
  unsigned i = 0;
  for (const auto& [index, newest] : chunks) {
    auto out = list[i++];
    out.setIndex(index);
    if (newest.zero) {
      out.setEncoding(wire::ChunkEncoding::ZERO);
      continue;
    }
    out.setEncoding(newest.chunk.getEncoding());
    out.setCompression(newest.chunk.getCompression());
    out.setRawSize(newest.chunk.getRawSize());
    if (newest.payload.empty()) continue;
    if (frames == nullptr) {
      out.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(newest.payload.data()), newest.payload.size()));
      continue;
    }
    if (frames->raw.empty() || frames->raw.back().size() + newest.payload.size() > kMergeFrameBytes)
      frames->raw.emplace_back();
    auto& blob = frames->raw.back();
    out.setBlob(static_cast<std::uint32_t>(frames->raw.size()));
    out.setBlobOffset(static_cast<std::uint32_t>(blob.size()));
    out.setBlobSize(static_cast<std::uint32_t>(newest.payload.size()));
    blob.insert(blob.end(), newest.payload.begin(), newest.payload.end());
  }
}

/// Writes the gathered payloads as zstd frames (plain where zstd does not
/// shrink them) into the merge's blobs.
void writeFrames(const MergeFrames& frames, wire::Checkpoint::Builder out) {
  auto blobs = out.initBlobs(static_cast<unsigned>(frames.raw.size()));
  auto infos = out.initBlobFrames(static_cast<unsigned>(frames.raw.size()));
  std::vector<std::byte> frame;
  for (unsigned k = 0; k < frames.raw.size(); ++k) {
    const auto& raw = frames.raw[k];
    frame.resize(zstdFrameBound(raw.size()));
    const std::size_t n = compressZstdFrame(raw, kDefaultZstdLevel, frame);
    const auto& bytes = n > 0 ? std::span<const std::byte>(frame.data(), n) : std::span<const std::byte>(raw);
    blobs.set(k, kj::arrayPtr(reinterpret_cast<const kj::byte*>(bytes.data()), bytes.size()));
    infos[k].setCompression(n > 0 ? wire::Compression::ZSTD : wire::Compression::NONE);
    infos[k].setRawSize(raw.size());
  }
}

}  // namespace

std::string mergeCheckpoints(const std::vector<wire::Checkpoint::Reader>& run, wire::Checkpoint::Builder out) {
  if (run.empty()) return "nothing to merge";
  for (std::size_t i = 1; i < run.size(); ++i) {
    if (run[i].getBaseSequence() != run[i - 1].getSequence() || run[i].getSequence() <= run[i - 1].getSequence())
      return fmt::format("checkpoint {} is based on {}, not on {}", run[i].getSequence(), run[i].getBaseSequence(),
                         run[i - 1].getSequence());
    if (run[i].getKind() == wire::CheckpointKind::FULL)
      return fmt::format("checkpoint {} is full; only the first of a run may be", run[i].getSequence());
  }
  const auto first = run.front();
  const auto last = run.back();
  const bool full = first.getKind() == wire::CheckpointKind::FULL;
  if (full && last.getKind() == wire::CheckpointKind::FINAL && run.size() > 1)
    return "a full checkpoint cannot be merged with a final one (the merge would need both kinds)";
  // Blobs in zstd frames are decompressed once per checkpoint, and kept until
  // the chunks are copied out of them.
  std::vector<PayloadBlobs> blobs;
  blobs.reserve(run.size());
  for (auto checkpoint : run) {
    try {
      blobs.emplace_back(checkpoint);
    } catch (const Error& e) {
      return e.what();
    }
  }
  std::map<std::uint64_t, Newest> memory, disk;
  if (auto why = newestChunks(run, blobs, [](auto c) { return c.getMemory(); }, memory); !why.empty()) return why;
  if (auto why = newestChunks(run, blobs, [](auto c) { return c.getDisk(); }, disk); !why.empty()) return why;

  out.setVmId(last.getVmId());
  out.setEpoch(last.getEpoch());
  out.setSequence(last.getSequence());
  out.setBaseSequence(first.getBaseSequence());
  out.setPolicy(last.getPolicy());
  out.setOrigin(last.getOrigin());
  out.setCreatedUnixNs(last.getCreatedUnixNs());
  if (full) {
    out.setKind(wire::CheckpointKind::FULL);
    out.setSpec(first.getSpec());
  } else if (last.getKind() == wire::CheckpointKind::FINAL) {
    out.setKind(wire::CheckpointKind::FINAL);
    copyDeviceState(last, out);
    out.setImageDigest(last.getImageDigest());
  } else {
    out.setKind(wire::CheckpointKind::INCREMENTAL);
  }
  // Payloads that came in zstd frames leave in zstd frames; the others in
  // their chunks, as they came.
  bool framed = false;
  for (const PayloadBlobs& b : blobs) framed |= b.framedBytes() > 0;
  MergeFrames frames;
  copyChunks(memory, out.initMemory(static_cast<unsigned>(memory.size())), framed ? &frames : nullptr);
  copyChunks(disk, out.initDisk(static_cast<unsigned>(disk.size())), framed ? &frames : nullptr);
  if (framed) writeFrames(frames, out);
  return {};
}

}  // namespace vmsync
