// The fuzz input as a flat Cap'n Proto message, shared by the targets that
// take whole messages.
#pragma once

#include <capnp/message.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace vmsync::fuzz {

/// The input's whole words (an aligned copy; a trailing partial word is dropped).
inline std::vector<capnp::word> inputWords(const std::uint8_t* data, std::size_t size) {
  std::vector<capnp::word> words(size / sizeof(capnp::word));
  std::memcpy(words.data(), data, words.size() * sizeof(capnp::word));
  return words;
}

/// Reader limits for fuzzed messages: small enough to keep every run fast.
inline capnp::ReaderOptions inputLimits() {
  capnp::ReaderOptions limits;
  limits.traversalLimitInWords = 1 << 20;
  limits.nestingLimit = 16;
  return limits;
}

}  // namespace vmsync::fuzz
