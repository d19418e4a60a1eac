// On-disk framing of one stored checkpoint: a small header with magic,
// version, payload length and the xxh3 of the payload, then the payload (a
// flat Cap'n Proto message). A record whose header or checksum does not match
// is torn or damaged and is never applied.
#pragma once

#include <capnp/common.h>
#include <capnp/message.h>
#include <kj/array.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/crash_point.h"

namespace vmsync {

/// Fixed-size header in front of every stored checkpoint (little-endian).
struct RecordHeader {
  std::uint64_t magic;     // kRecordMagic
  std::uint32_t version;   // kRecordVersion
  std::uint32_t reserved;  // zero
  std::uint64_t length;    // payload bytes that follow the header
  std::uint64_t checksum;  // XXH3_64bits of the payload
};
static_assert(sizeof(RecordHeader) == 32);

/// "VMSYNCR1" read as a little-endian word.
inline constexpr std::uint64_t kRecordMagic = 0x3152434e59534d56ull;
/// Bumped on any change of the framing; older versions are refused by name.
inline constexpr std::uint32_t kRecordVersion = 1;
/// Largest payload a reader accepts: the largest message the RPC accepts.
inline constexpr std::uint64_t kMaxRecordPayload = 2ull << 30;

/// The header for `payload`.
RecordHeader makeRecordHeader(std::span<const std::byte> payload);

/// Checks `header` read from `what` (a path, for messages) against the
/// `available` bytes after it. Returns an empty string when valid, else why not.
std::string checkRecordHeader(const RecordHeader& header, std::uint64_t available);

/// Returns an empty string when `payload` matches `header`'s checksum, else why not.
std::string checkRecordPayload(const RecordHeader& header, std::span<const std::byte> payload);

/// Writes `payload` as one record to `path`: to `path`.tmp first (one io_uring
/// submission of the write linked to an fsync), then renamed into place and the
/// directory fsynced, so after a crash the file is whole or absent. With
/// `crashPoints`, VMSYNC_CRASH_AT can stop the process between the steps
/// (before-data-write, after-data-fsync, after-rename, after-commit).
void writeRecordFile(const std::string& path, std::span<const std::byte> payload, bool crashPoints = false);

/// writeRecordFile() of `message` as a flat message (its segment table, then
/// its segments), written from the message's own segments: no flat copy of
/// it is made first. With `pacedWindow`, written that many bytes at a time,
/// each window on the disk before the next (for large files written in the
/// background, so that they do not hold up other files' fsyncs).
void writeMessageRecordFile(const std::string& path, capnp::MessageBuilder& message,
                            bool crashPoints = false, std::size_t pacedWindow = 0);

/// Reads and verifies the record in `path`: its payload as words, or nullptr
/// with the reason it is torn or damaged in `why`. Throws Error when the file
/// cannot be opened or read at all.
kj::Maybe<kj::Array<capnp::word>> readRecordFile(const std::string& path, std::string& why);

}  // namespace vmsync
