// Per-unit content hashes and the image digest built from them.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace vmsync {

class ImageFile;

/// xxh3-64 of one 4096-byte unit (built for AVX2 where the CPU has it).
std::uint64_t hashUnit(std::span<const std::byte> unit);

/// The same hash from the xxhash library's own build, for tests and benchmarks.
std::uint64_t hashUnitPortable(std::span<const std::byte> unit);

/// The hash of an all-zero unit.
std::uint64_t zeroUnitHash();

/// Hashes of every unit of `image`, in order. Units in holes of the file
/// (ImageFile::dataRuns) get zeroUnitHash() without being read.
std::vector<std::uint64_t> hashAllUnits(const ImageFile& image);

/// Digest of a VM image (RAM then disk): xxh3-128 over the per-unit hash arrays.
/// Two images have the same digest exactly when every unit hash matches, which
/// catches any corruption short of a deliberate 64-bit collision.
using Digest = std::array<std::byte, 16>;
Digest imageDigest(std::span<const std::uint64_t> ramHashes,
                   std::span<const std::uint64_t> diskHashes);

/// Lower-case hex of a digest, for messages.
std::string toHex(std::span<const std::byte> bytes);

}  // namespace vmsync
