#include "checkpoint/checkpoint_applier.h"

#include <capnp/dynamic.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <vector>

#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/chunk_codec.h"
#include "checkpoint/device_state_codec.h"
#include "base/error.h"
#include "base/thread_pool.h"
#include "base/units.h"
#include "harvest/unit_hashes.h"

namespace vmsync {

namespace {

constexpr std::size_t kDecodeGrain = 64;  // chunks decoded per task

/// The position of the first chunk that names a unit an earlier chunk named,
/// or count if none does. Memory is bounded by the list, not by the image: a
/// message of a few words may describe an image of petabytes, and a bitmap of
/// its units would be gigabytes. The bitmap is used while it is smaller than
/// a sorted copy of the indexes.
std::size_t firstRepeat(const std::vector<std::uint64_t>& indexes, std::uint64_t units) {
  if (units / 64 <= indexes.size()) {
    std::vector<bool> seen(units);
    for (std::size_t i = 0; i < indexes.size(); ++i) {
      if (seen[indexes[i]]) return i;
      seen[indexes[i]] = true;
    }
    return indexes.size();
  }
  std::vector<std::pair<std::uint64_t, std::size_t>> sorted(indexes.size());
  for (std::size_t i = 0; i < indexes.size(); ++i) sorted[i] = {indexes[i], i};
  std::sort(sorted.begin(), sorted.end());
  // Within a run of equal indexes the first is the unit's first naming; every
  // later one repeats it. The earliest repeat is the smallest such position.
  std::size_t first = indexes.size();
  for (std::size_t k = 1; k < sorted.size(); ++k)
    if (sorted[k].first == sorted[k - 1].first) first = std::min(first, sorted[k].second);
  return first;
}

/// Decoded units of one list: where each unit's bytes are. Units that needed no
/// decoding (whole and uncompressed, or zero) point into the message or at a
/// zero page; the others into `decoded`.
struct DecodedList {
  std::vector<UnitWrite> writes;  // in chunk order
  std::vector<std::byte, RecyclingAllocator<std::byte>> decoded;
  std::uint64_t references = 0;   // REFERENCE chunks among them
};

/// Refuses a REFERENCE chunk that cannot be followed: in a full checkpoint,
/// or naming a unit outside an image of `units` units. Returns its reference.
UnitReference checkReference(const ChunkFields& fields, std::uint32_t position, std::uint64_t units, bool full,
                             const char* what) {
  UnitReference reference;
  try {
    reference = referenceOf(fields);
  } catch (const Error& e) {
    fail("{} {}", what, e.what());
  }
  if (full)
    fail("{} chunk {} (unit {}) is a reference, but a full checkpoint starts from an empty image", what, position,
         fields.index);
  if (reference.source >= units)
    fail("{} chunk {} (unit {}) refers to unit {}, but the image has {} units", what, position, fields.index,
         reference.source, units);
  return reference;
}

DecodedList decodeList(capnp::List<wire::Chunk>::Reader chunks, const PayloadBlobs& blobs,
                       const ImageFile& image, const ImageFile* base, bool full, const char* what) {
  // Each unit may appear once: more chunks than units is malformed, and is
  // refused before the decode buffer is sized from the count.
  if (chunks.size() > image.units())
    fail("{} list has {} chunks, but the image has only {} units", what, chunks.size(), image.units());
  const std::uint32_t count = chunks.size();
  DecodedList out;
  out.writes.resize(count);
  // First the checks that need the whole list, in order: index range, each unit
  // once, SAME_AS pointing backwards. Chunks that need decoding get a slot.
  constexpr std::uint32_t kNoSlot = ~std::uint32_t{0};
  std::vector<std::uint32_t> slot(count, kNoSlot);
  std::vector<ChunkFields> fields(count);
  std::vector<std::uint32_t> sameAs(count);
  std::vector<UnitReference> references(count);  // for REFERENCE chunks
  std::uint32_t slots = 0;
  std::vector<std::uint64_t> indexes(count);
  for (std::uint32_t i = 0; i < count; ++i) {
    auto chunk = chunks[i];
    try {
      fields[i] = chunkFields(chunk, blobs);
    } catch (const Error& e) {
      fail("{} {}", what, e.what());
    }
    std::uint64_t index = fields[i].index;
    if (index >= image.units())
      fail("{} chunk {} names unit {}, but the image has {} units", what, i, index, image.units());
    indexes[i] = index;
    out.writes[i].index = index;
    if (fields[i].encoding == wire::ChunkEncoding::SAME_AS) {
      std::uint32_t earlier = chunk.getSameAs();
      if (earlier >= i) fail("{} chunk {} refers to chunk {}, which does not come before it", what, i, earlier);
      sameAs[i] = earlier;
    } else if (fields[i].encoding == wire::ChunkEncoding::REFERENCE) {
      references[i] = checkReference(fields[i], i, image.units(), full, what);
      slot[i] = slots++;
      ++out.references;
    } else if (auto bytes = unitInPlace(fields[i]); !bytes.empty()) {
      out.writes[i].bytes = bytes.data();
    } else {
      slot[i] = slots++;
    }
  }
  if (const std::size_t i = firstRepeat(indexes, image.units()); i < count)
    fail("{} chunk {} names unit {} a second time", what, i, indexes[i]);
  // Then decode, on every core (reading only `fields`, not the message). Each task keeps its first error; the error
  // reported is the one of the earliest chunk, as a serial decode would.
  out.decoded.resize(std::size_t{slots} * kUnitSize);
  std::vector<std::exception_ptr> errors((count + kDecodeGrain - 1) / kDecodeGrain);
  defaultThreadPool().parallelFor(count, kDecodeGrain, [&](std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) {
      if (slot[i] == kNoSlot) continue;
      std::span<std::byte> dest(out.decoded.data() + std::size_t{slot[i]} * kUnitSize, kUnitSize);
      const std::uint64_t index = out.writes[i].index;
      if (fields[i].encoding == wire::ChunkEncoding::REFERENCE) {
        // The source as the image holds it now, before anything of this
        // checkpoint is written; used only if it is the content named.
        const UnitReference& reference = references[i];
        std::memcpy(dest.data(), image.unit(reference.source).data(), kUnitSize);
        if (const std::uint64_t found = hashUnit(dest); found != reference.hash) {
          errors[begin / kDecodeGrain] = std::make_exception_ptr(ReferenceMismatch(fmt::format(
              "{} unit {} refers to unit {} with hash {:016x}, but that unit of this image hashes to {:016x}: the "
              "image is not what the sender holds it to be, and needs the unit from the server",
              what, index, reference.source, reference.hash, found)));
          return;
        }
        out.writes[i].bytes = dest.data();
        continue;
      }
      try {
        decodeUnit(fields[i], base ? base->unit(index) : image.unit(index), dest);
      } catch (const Error& e) {
        errors[begin / kDecodeGrain] = std::make_exception_ptr(Error(fmt::format("{} {}", what, e.what())));
        return;
      }
      out.writes[i].bytes = dest.data();
    }
  });
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
  // SAME_AS last: its earlier chunk is resolved by now.
  for (std::uint32_t i = 0; i < count; ++i)
    if (out.writes[i].bytes == nullptr) out.writes[i].bytes = out.writes[sameAs[i]].bytes;
  return out;
}

/// Orig: every unit not in `list` that differs from the base goes back to it;
/// their indexes are added to `written`.
std::uint64_t restoreOthers(const DecodedList& list, ImageFile& image, const ImageFile& base,
                            std::vector<std::uint64_t>& written) {
  // Units in holes of both files are zeros in both: only the others are
  // compared, and what they read comes in by large reads.
  std::vector<bool> compare(image.units());
  for (const ImageFile* file : {static_cast<const ImageFile*>(&image), &base}) {
    const auto runs = file->dataRuns();
    file->prefetch(runs);
    for (const UnitRun& run : runs)
      std::fill(compare.begin() + static_cast<std::ptrdiff_t>(run.first),
                compare.begin() + static_cast<std::ptrdiff_t>(run.end), true);
  }
  for (const auto& write : list.writes) compare[write.index] = false;
  std::vector<UnitWrite> restore;
  for (std::uint64_t i = 0; i < image.units(); ++i)
    if (compare[i] && std::memcmp(image.unit(i).data(), base.unit(i).data(), kUnitSize) != 0)
      restore.push_back({i, base.unit(i).data()});
  image.writeUnits(restore);
  for (const auto& write : restore) written.push_back(write.index);
  return restore.size();
}

void validateList(capnp::List<wire::Chunk>::Reader chunks, const PayloadBlobs& blobs,
                  std::uint64_t units, bool full, const char* what) {
  if (chunks.size() > units)
    fail("{} list has {} chunks, but the image has only {} units", what, chunks.size(), units);
  std::vector<std::uint64_t> indexes(chunks.size());
  static const std::byte zeros[kUnitSize] = {};
  std::byte scratch[kUnitSize];
  for (std::uint32_t i = 0; i < chunks.size(); ++i) {
    auto chunk = chunks[i];
    const std::uint64_t index = chunk.getIndex();
    if (index >= units) fail("{} chunk {} names unit {}, but the image has {} units", what, i, index, units);
    indexes[i] = index;
    if (chunk.getEncoding() == wire::ChunkEncoding::SAME_AS) {
      if (chunk.getSameAs() >= i)
        fail("{} chunk {} refers to chunk {}, which does not come before it", what, i, chunk.getSameAs());
      continue;
    }
    if (chunk.getEncoding() == wire::ChunkEncoding::REFERENCE) {
      // Its source is checked against its hash where the image is.
      ChunkFields fields;
      try {
        fields = chunkFields(chunk, blobs);
      } catch (const Error& e) {
        fail("{} {}", what, e.what());
      }
      (void)checkReference(fields, i, units, full, what);
      continue;
    }
    try {
      decodeChunk(chunk, std::span<const std::byte>(zeros, kUnitSize),
                  std::span<std::byte>(scratch, kUnitSize), blobs);
    } catch (const Error& e) {
      fail("{} {}", what, e.what());
    }
  }
  if (const std::size_t i = firstRepeat(indexes, units); i < indexes.size())
    fail("{} chunk {} names unit {} a second time", what, i, indexes[i]);
}

}  // namespace

namespace {

/// Reads `value` and, for a struct or a list, everything in it.
void readEveryField(capnp::DynamicValue::Reader value) {
  switch (value.getType()) {
    case capnp::DynamicValue::STRUCT: {
      auto fields = value.as<capnp::DynamicStruct>();
      for (auto field : fields.getSchema().getFields())
        if (fields.has(field)) readEveryField(fields.get(field));
      break;
    }
    case capnp::DynamicValue::LIST: {
      // Only elements that hold pointers can hold a field of the wrong kind.
      // Elements without (numbers, or structs laid out with no pointer
      // section) are skipped: a list of empty structs may claim 2^29 of them
      // in one word, and walking them would only take time.
      auto list = value.as<capnp::DynamicList>();
      switch (list.getSchema().whichElementType()) {
        case capnp::schema::Type::STRUCT:
          if (list.size() == 0 ||
              list[0].as<capnp::DynamicStruct>().as<capnp::AnyStruct>().getPointerSection().size() == 0)
            return;
          break;
        case capnp::schema::Type::TEXT:
        case capnp::schema::Type::DATA:
        case capnp::schema::Type::LIST:
        case capnp::schema::Type::INTERFACE:
        case capnp::schema::Type::ANY_POINTER:
          break;
        default:
          return;
      }
      for (auto element : list) readEveryField(element);
      break;
    }
    default:
      break;  // a number, an enum, text or data: read by get() already
  }
}

}  // namespace

void checkWellFormed(wire::Checkpoint::Reader checkpoint) {
  KJ_IF_MAYBE(e, kj::runCatchingExceptions([&]() {
        readEveryField(capnp::toDynamic(checkpoint));
        // The walk above reads the fields the schema knows. A message may
        // also carry pointers in slots the schema does not name (a newer
        // version's fields); copying the message follows those too, so each
        // must stay within the message. totalSize() follows every pointer.
        (void)checkpoint.totalSize();
      })) {
    fail("checkpoint {} is not a well-formed message: {}", checkpoint.getSequence(), e->getDescription().cStr());
  }
}

void validateCheckpoint(wire::Checkpoint::Reader checkpoint, std::uint64_t memoryUnits, std::uint64_t diskUnits) {
  checkWellFormed(checkpoint);
  const PayloadBlobs blobs(checkpoint);
  const bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  validateList(checkpoint.getMemory(), blobs, memoryUnits, full, "memory");
  validateList(checkpoint.getDisk(), blobs, diskUnits, full, "disk");
  // A final checkpoint's device state must decode, or no device could resume from it.
  if (checkpoint.getKind() == wire::CheckpointKind::FINAL) (void)deviceStateOf(checkpoint);
}

ApplyStats applyCheckpoint(wire::Checkpoint::Reader checkpoint, ImageFile& ram, ImageFile& disk, BaseImage base) {
  const bool orig = isOrigPolicy(checkpoint.getPolicy()) && checkpoint.getKind() != wire::CheckpointKind::FULL;
  if (orig && (base.ram == nullptr || base.disk == nullptr))
    fail("checkpoint {} is measured against the base image, which this device does not have",
         checkpoint.getSequence());
  const bool full = checkpoint.getKind() == wire::CheckpointKind::FULL;
  const PayloadBlobs blobs(checkpoint);
  // Both lists are decoded before either image is written: a reference reads
  // its source as the image was before this checkpoint.
  DecodedList memory =
      decodeList(checkpoint.getMemory(), blobs, ram, orig ? base.ram : nullptr, full, "memory");
  DecodedList blocks =
      decodeList(checkpoint.getDisk(), blobs, disk, orig ? base.disk : nullptr, full, "disk");
  ApplyStats stats{memory.writes.size(), blocks.writes.size(), 0, memory.references + blocks.references, {}, {}};
  for (const auto& write : memory.writes) stats.ramWritten.push_back(write.index);
  for (const auto& write : blocks.writes) stats.diskWritten.push_back(write.index);
  // Nothing has been written up to here: every chunk is decoded and checked.
  if (orig) {
    stats.restoredUnits += restoreOthers(memory, ram, *base.ram, stats.ramWritten);
    stats.restoredUnits += restoreOthers(blocks, disk, *base.disk, stats.diskWritten);
  }
  ram.writeUnits(memory.writes);
  disk.writeUnits(blocks.writes);
  return stats;
}

}  // namespace vmsync
