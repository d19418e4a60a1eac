#include "checkpoint_applier.h"

#include <cstring>
#include <vector>

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

DecodedList decodeList(capnp::List<wire::Chunk>::Reader chunks, const ImageFile& image, const char* what) {
  DecodedList out;
  out.indexes.reserve(chunks.size());
  out.bytes.resize(static_cast<std::size_t>(chunks.size()) * kUnitSize);
  for (std::uint32_t i = 0; i < chunks.size(); ++i) {
    auto chunk = chunks[i];
    std::uint64_t index = chunk.getIndex();
    if (index >= image.units())
      fail("{} chunk {} names unit {}, but the image has {} units", what, i, index, image.units());
    std::span<std::byte> dest(out.bytes.data() + static_cast<std::size_t>(i) * kUnitSize, kUnitSize);
    if (chunk.getEncoding() == wire::ChunkEncoding::SAME_AS) {
      std::uint32_t earlier = chunk.getSameAs();
      if (earlier >= i) fail("{} chunk {} refers to chunk {}, which does not come before it", what, i, earlier);
      std::memcpy(dest.data(), out.bytes.data() + static_cast<std::size_t>(earlier) * kUnitSize, kUnitSize);
    } else {
      try {
        decodeChunk(chunk, image.unit(index), dest);
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

}  // namespace

ApplyStats applyCheckpoint(wire::Checkpoint::Reader checkpoint, ImageFile& ram, ImageFile& disk) {
  DecodedList memory = decodeList(checkpoint.getMemory(), ram, "memory");
  DecodedList blocks = decodeList(checkpoint.getDisk(), disk, "disk");
  writeList(memory, ram);
  writeList(blocks, disk);
  return ApplyStats{memory.indexes.size(), blocks.indexes.size()};
}

}  // namespace vmsync
