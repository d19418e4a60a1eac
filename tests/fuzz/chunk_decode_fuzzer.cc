// decodeChunk on a chunk whose fields come from the input: encoding,
// compression, raw size and payload are all attacker-chosen.
#include <capnp/message.h>

#include <cstring>
#include <vector>

#include "checkpoint/chunk_codec.h"
#include "base/error.h"
#include "base/units.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 6) return 0;
  capnp::MallocMessageBuilder message;
  auto chunk = message.initRoot<vmsync::wire::Chunk>();
  chunk.setIndex(data[0]);
  chunk.setEncoding(static_cast<vmsync::wire::ChunkEncoding>(data[1] % 5));
  chunk.setCompression(static_cast<vmsync::wire::Compression>(data[2] % 4));
  std::uint32_t raw;
  std::memcpy(&raw, data + 2, sizeof raw);
  chunk.setRawSize(raw % (3 * vmsync::kUnitSize));
  chunk.setData(kj::arrayPtr(data + 6, size - 6));
  std::vector<std::byte> reference(vmsync::kUnitSize, std::byte{0x22});
  std::vector<std::byte> out(vmsync::kUnitSize);
  try {
    vmsync::decodeChunk(chunk.asReader(), data[1] & 0x80 ? std::span<const std::byte>{} : reference, out);
  } catch (const vmsync::Error&) {
  }
  return 0;
}
