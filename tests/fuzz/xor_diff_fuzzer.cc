// decodeXorDiff on arbitrary bytes: it may reject, never read or write out of bounds.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "checkpoint/chunk_codec.h"
#include "base/error.h"
#include "base/units.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> reference(vmsync::kUnitSize, std::byte{0x11});
  std::vector<std::byte> out(vmsync::kUnitSize);
  try {
    vmsync::decodeXorDiff({reinterpret_cast<const std::byte*>(data), size}, reference, out);
  } catch (const vmsync::Error&) {
  }
  // Round trip: any unit encodes and decodes back to itself.
  if (size >= vmsync::kUnitSize) {
    std::span<const std::byte> current(reinterpret_cast<const std::byte*>(data), vmsync::kUnitSize);
    std::vector<std::byte> encoded;
    if (vmsync::encodeXorDiff(current, reference, 2 * vmsync::kUnitSize, encoded)) {
      vmsync::decodeXorDiff(encoded, reference, out);
      if (!std::equal(out.begin(), out.end(), current.begin())) __builtin_trap();
    }
  }
  return 0;
}
