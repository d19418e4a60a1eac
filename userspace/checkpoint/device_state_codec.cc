#include "checkpoint/device_state_codec.h"

#include <lz4.h>

#include <limits>

#include "base/error.h"

namespace vmsync {

std::uint64_t setDeviceState(wire::Checkpoint::Builder checkpoint, std::span<const std::byte> state) {
  checkpoint.setDeviceStateRawSize(state.size());
  if (!state.empty() && state.size() <= static_cast<std::size_t>(LZ4_MAX_INPUT_SIZE)) {
    std::vector<char> packed(static_cast<std::size_t>(LZ4_compressBound(static_cast<int>(state.size()))));
    const int size = LZ4_compress_default(reinterpret_cast<const char*>(state.data()), packed.data(),
                                          static_cast<int>(state.size()), static_cast<int>(packed.size()));
    if (size > 0 && static_cast<std::size_t>(size) < state.size()) {
      checkpoint.setDeviceStateEncoding(wire::StateEncoding::LZ4);
      checkpoint.setDeviceState(kj::arrayPtr(reinterpret_cast<const kj::byte*>(packed.data()),
                                             static_cast<std::size_t>(size)));
      return static_cast<std::uint64_t>(size);
    }
  }
  checkpoint.setDeviceStateEncoding(wire::StateEncoding::RAW);
  checkpoint.setDeviceState(kj::arrayPtr(reinterpret_cast<const kj::byte*>(state.data()), state.size()));
  return state.size();
}

std::vector<std::byte> deviceStateOf(wire::Checkpoint::Reader checkpoint) {
  const auto stored = checkpoint.getDeviceState();
  const std::uint64_t raw = checkpoint.getDeviceStateRawSize();
  const std::uint64_t sequence = checkpoint.getSequence();
  switch (checkpoint.getDeviceStateEncoding()) {
    case wire::StateEncoding::RAW:
      // Written before the size was recorded, a raw state says 0: its own size counts.
      if (raw != 0 && raw != stored.size())
        fail("checkpoint {}: its device state is {} bytes but says it is {}", sequence, stored.size(), raw);
      return {reinterpret_cast<const std::byte*>(stored.begin()), reinterpret_cast<const std::byte*>(stored.end())};
    case wire::StateEncoding::LZ4: {
      if (raw == 0 || raw > kMaxDeviceStateBytes)
        fail("checkpoint {}: its device state claims {} bytes once decoded (at most {} are accepted)", sequence, raw,
             kMaxDeviceStateBytes);
      if (stored.size() > static_cast<std::size_t>(std::numeric_limits<int>::max()))
        fail("checkpoint {}: its compressed device state is too large ({} bytes)", sequence, stored.size());
      std::vector<std::byte> state(raw);
      const int size = LZ4_decompress_safe(reinterpret_cast<const char*>(stored.begin()),
                                           reinterpret_cast<char*>(state.data()), static_cast<int>(stored.size()),
                                           static_cast<int>(raw));
      if (size < 0 || static_cast<std::uint64_t>(size) != raw)
        fail("checkpoint {}: its device state does not decode to the {} bytes it claims", sequence, raw);
      return state;
    }
  }
  fail("checkpoint {}: its device state has an encoding this version does not know ({})", sequence,
       static_cast<unsigned>(checkpoint.getDeviceStateEncoding()));
}

void copyDeviceState(wire::Checkpoint::Reader from, wire::Checkpoint::Builder to) {
  to.setDeviceState(from.getDeviceState());
  to.setDeviceStateEncoding(from.getDeviceStateEncoding());
  to.setDeviceStateRawSize(from.getDeviceStateRawSize());
}

}  // namespace vmsync
