#include "checkpoint_record.h"

#include <fmt/format.h>
#include <xxhash.h>


namespace vmsync {

RecordHeader makeRecordHeader(std::span<const std::byte> payload) {
  return RecordHeader{kRecordMagic, kRecordVersion, 0, payload.size(), XXH3_64bits(payload.data(), payload.size())};
}

std::string checkRecordHeader(const RecordHeader& header, std::uint64_t available) {
  if (header.magic != kRecordMagic) return "it does not start with a vmsync record header";
  if (header.version != kRecordVersion)
    return fmt::format("record version {} is not the supported version {}", header.version, kRecordVersion);
  if (header.length > kMaxRecordPayload)
    return fmt::format("record claims {} bytes, above the limit of {}", header.length, kMaxRecordPayload);
  if (header.length % 8 != 0) return fmt::format("record length {} is not a whole number of words", header.length);
  if (header.length != available)
    return fmt::format("record claims {} bytes but {} follow its header (torn write)", header.length, available);
  return {};
}

std::string checkRecordPayload(const RecordHeader& header, std::span<const std::byte> payload) {
  std::uint64_t actual = XXH3_64bits(payload.data(), payload.size());
  if (actual != header.checksum)
    return fmt::format("payload checksum {:016x} does not match the recorded {:016x}", actual, header.checksum);
  return {};
}

}  // namespace vmsync
