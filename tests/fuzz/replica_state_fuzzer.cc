// A device's state directory made of the input's files (vm.json, applied,
// device-state.seq, the apply journal and the marker files), opened by the
// real Replica, which loads them and finishes an interrupted apply from the
// journal: it opens, at a whole checkpoint, with images of the sizes its
// vm.json says, or refuses the directory with an Error. Never a crash.
//
// Input: sections split by kSectionMark: flags (first byte, see below),
// vm.json, applied, device-state.seq, the journal's payload. An empty
// section is an absent file.
#include <capnp/message.h>

#include <spdlog/spdlog.h>

#include <cstdint>
#include <string>

#include "base/error.h"
#include "base/units.h"
#include "daemon/replica.h"
#include "fuzz_files.h"
#include "vmm/image_file.h"

namespace {

constexpr std::uint64_t kMemoryUnits = 16, kDiskUnits = 8;
/// Hashing an image bigger than this (a full checkpoint in the journal may
/// declare any size) would only make the run slow.
constexpr std::uint64_t kMaxHashedBytes = 1 << 20;

enum Flags : std::uint8_t {
  kDiverged = 1,       // the "diverged" marker
  kVmmRunning = 2,     // the "vmm-running" marker: a VMM died on the image
  kRawJournal = 4,     // the journal as it is, no record header
  kDamagedJournal = 8, // a journal record whose checksum does not match
  kBaseImages = 16,    // base-ram.img and base-disk.img (Orig policies)
  kNoImages = 32,      // no ram.img / disk.img
};

void createImage(const std::string& path, std::uint64_t bytes) {
  vmsync::ImageFile image(path, true, bytes);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // the refusals are expected; logging them only costs time
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static vmsync::fuzz::ScratchDir scratch("replica");
  scratch.clear();
  const std::string& dir = scratch.path();
  const auto sections = vmsync::fuzz::splitSections(data, size, 5);
  const std::uint8_t flags = sections[0].empty() ? 0 : static_cast<std::uint8_t>(sections[0][0]);
  auto section = [&](std::size_t i) { return i < sections.size() ? sections[i] : std::string_view{}; };
  if (!section(1).empty()) vmsync::fuzz::writeFile(dir + "/vm.json", section(1));
  if (!section(2).empty()) vmsync::fuzz::writeFile(dir + "/applied", section(2));
  if (!section(3).empty()) vmsync::fuzz::writeFile(dir + "/device-state.seq", section(3));
  if (!section(4).empty()) {
    if (flags & kRawJournal) vmsync::fuzz::writeFile(dir + "/apply.journal", section(4));
    else vmsync::fuzz::writeRecord(dir + "/apply.journal", section(4), flags & kDamagedJournal);
  }
  if (flags & kDiverged) vmsync::fuzz::writeFile(dir + "/diverged", "1");
  if (flags & kVmmRunning) vmsync::fuzz::writeFile(dir + "/vmm-running", "1");
  if (!(flags & kNoImages)) {
    createImage(dir + "/ram.img", kMemoryUnits * vmsync::kUnitSize);
    createImage(dir + "/disk.img", kDiskUnits * vmsync::kUnitSize);
  }
  if (flags & kBaseImages) {
    createImage(dir + "/base-ram.img", kMemoryUnits * vmsync::kUnitSize);
    createImage(dir + "/base-disk.img", kDiskUnits * vmsync::kUnitSize);
  }

  try {
    vmsync::Replica replica(dir, "fuzz");
    // Opened: the journal is gone (finished or discarded) and the images,
    // if any, are the sizes the spec says.
    if (std::filesystem::exists(dir + "/apply.journal")) __builtin_trap();
    if (replica.hasImages()) {
      if (replica.ram().sizeBytes() != replica.spec().memoryBytes ||
          replica.disk().sizeBytes() != replica.spec().diskBytes)
        __builtin_trap();
      if (replica.spec().memoryBytes + replica.spec().diskBytes <= kMaxHashedBytes) {
        auto hashes = replica.currentHashes();
        if (hashes.ram.size() != replica.spec().memoryBytes / vmsync::kUnitSize) __builtin_trap();
      }
    } else if (replica.applied() != 0) {
      __builtin_trap();  // applied checkpoints without an image
    }
    if (replica.resumable()) (void)replica.deviceStateForResume();
  } catch (const vmsync::Error&) {
    // Refused, with a reason.
  }
  return 0;
}
