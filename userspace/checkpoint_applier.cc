#include "checkpoint_applier.h"

#include <cstring>
#include <vector>

#include "checkpoint_builder.h"
#include "chunk_codec.h"
#include "error.h"
#include "units.h"

namespace vmsync {

namespace {

/// Decoded units of one list, in a single buffer.
struct DecodedList {
  std::vector<std::uint64_t> indexes;
  std::vector<std::byte> bytes;
};

DecodedList decodeList(capnp::List<wire::Chunk>::Reader chunks, const ImageFile& image, const ImageFile* base,
                       const char* what) {
  // Each unit may appear once: more chunks than units is malformed, and is
  // refused before the decode buffer is sized from the count.
  if (chunks.size() > image.units())
    fail("{} list has {} chunks, but the image has only {} units", what, chunks.size(), image.units());
  DecodedList out;
  out.indexes.reserve(chunks.size());
  out.bytes.resize(static_cast<std::size_t>(chunks.size()) * kUnitSize);
  std::vector<bool> seen(image.units());
  for (std::uint32_t i = 0; i < chunks.size(); ++i) {
    auto chunk = chunks[i];
    std::uint64_t index = chunk.getIndex();
    if (index >= image.units())
      fail("{} chunk {} names unit {}, but the image has {} units", what, i, index, image.units());
    if (seen[index]) fail("{} chunk {} names unit {} a second time", what, i, index);
    seen[index] = true;
    std::span<std::byte> dest(out.bytes.data() + static_cast<std::size_t>(i) * kUnitSize, kUnitSize);
    if (chunk.getEncoding() == wire::ChunkEncoding::SAME_AS) {
      std::uint32_t earlier = chunk.getSameAs();
      if (earlier >= i) fail("{} chunk {} refers to chunk {}, which does not come before it", what, i, earlier);
      std::memcpy(dest.data(), out.bytes.data() + static_cast<std::size_t>(earlier) * kUnitSize, kUnitSize);
    } else {
      try {
        decodeChunk(chunk, base ? base->unit(index) : image.unit(index), dest);
      } catch (const Error& e) {
        fail("{} {}", what, e.what());
      }
    }
    out.indexes.push_back(index);
  }
  return out;
}

void writeList(const DecodedList& list, ImageFile& image) {
  for (std::size_t i = 0; i < list.indexes.size(); ++i)
    image.writeUnit(list.indexes[i], {list.bytes.data() + i * kUnitSize, kUnitSize});
}

/// Orig: every unit not in `list` that differs from the base goes back to it.
std::uint64_t restoreOthers(const DecodedList& list, ImageFile& image, const ImageFile& base) {
  std::vector<bool> inList(image.units());
  for (auto i : list.indexes) inList[i] = true;
  std::uint64_t restored = 0;
  for (std::uint64_t i = 0; i < image.units(); ++i) {
    if (inList[i] || std::memcmp(image.unit(i).data(), base.unit(i).data(), kUnitSize) == 0) continue;
    image.writeUnit(i, base.unit(i));
    ++restored;
  }
  return restored;
}

void validateList(capnp::List<wire::Chunk>::Reader chunks, std::uint64_t units, const char* what) {
  if (chunks.size() > units)
    fail("{} list has {} chunks, but the image has only {} units", what, chunks.size(), units);
  std::vector<bool> seen(units);
  static const std::byte zeros[kUnitSize] = {};
  std::byte scratch[kUnitSize];
  for (std::uint32_t i = 0; i < chunks.size(); ++i) {
    auto chunk = chunks[i];
    const std::uint64_t index = chunk.getIndex();
    if (index >= units) fail("{} chunk {} names unit {}, but the image has {} units", what, i, index, units);
    if (seen[index]) fail("{} chunk {} names unit {} a second time", what, i, index);
    seen[index] = true;
    if (chunk.getEncoding() == wire::ChunkEncoding::SAME_AS) {
      if (chunk.getSameAs() >= i)
        fail("{} chunk {} refers to chunk {}, which does not come before it", what, i, chunk.getSameAs());
      continue;
    }
    try {
      decodeChunk(chunk, std::span<const std::byte>(zeros, kUnitSize), std::span<std::byte>(scratch, kUnitSize));
    } catch (const Error& e) {
      fail("{} {}", what, e.what());
    }
  }
}

}  // namespace

void validateCheckpoint(wire::Checkpoint::Reader checkpoint, std::uint64_t memoryUnits, std::uint64_t diskUnits) {
  validateList(checkpoint.getMemory(), memoryUnits, "memory");
  validateList(checkpoint.getDisk(), diskUnits, "disk");
}

ApplyStats applyCheckpoint(wire::Checkpoint::Reader checkpoint, ImageFile& ram, ImageFile& disk, BaseImage base) {
  const bool orig = isOrigPolicy(checkpoint.getPolicy()) && checkpoint.getKind() != wire::CheckpointKind::FULL;
  if (orig && (base.ram == nullptr || base.disk == nullptr))
    fail("checkpoint {} is measured against the base image, which this device does not have",
         checkpoint.getSequence());
  DecodedList memory = decodeList(checkpoint.getMemory(), ram, orig ? base.ram : nullptr, "memory");
  DecodedList blocks = decodeList(checkpoint.getDisk(), disk, orig ? base.disk : nullptr, "disk");
  ApplyStats stats{memory.indexes.size(), blocks.indexes.size(), 0};
  if (orig) {
    stats.restoredUnits += restoreOthers(memory, ram, *base.ram);
    stats.restoredUnits += restoreOthers(blocks, disk, *base.disk);
  }
  writeList(memory, ram);
  writeList(blocks, disk);
  return stats;
}

}  // namespace vmsync
