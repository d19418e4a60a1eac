// zstd frames over a checkpoint's payload blobs: many units' payloads
// compressed as one frame, and decompressed with their size checked first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace vmsync {

/// The strongest zstd level a sender may ask for (libzstd's maximum).
int maxZstdLevel();

/// Room one zstd frame of `rawBytes` can need (zstd's compress bound).
std::size_t zstdFrameBound(std::size_t rawBytes);

/// Compresses `raw` as one zstd frame at `level`, its content size written in
/// its header, into `out` (zstdFrameBound(raw.size()) bytes at least). Returns
/// the frame's size, or 0 when the frame would not be smaller than `raw`.
/// The same input and level give the same bytes on any thread.
std::size_t compressZstdFrame(std::span<const std::byte> raw, int level, std::span<std::byte> out);

/// Decompresses `frame`, which must be exactly one zstd frame whose header
/// says it holds out.size() bytes, into `out`. Throws Error naming `what` when
/// the frame is corrupt, truncated, followed by other bytes, or holds more or
/// fewer bytes than out.size(): it never writes past `out`, whatever the frame
/// claims (a decompression bomb stops at out.size()).
void decompressZstdFrame(std::span<const std::byte> frame, std::span<std::byte> out, std::string_view what);

}  // namespace vmsync
