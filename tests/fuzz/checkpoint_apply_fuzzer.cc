// A whole checkpoint message from the input, applied to small images: it is
// applied or rejected whole, and never touches memory it does not own.
#include <capnp/serialize.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <vector>

#include "checkpoint/checkpoint_applier.h"
#include "base/error.h"
#include "checkpoint_mutator.h"
#include "fuzz_input.h"
#include "vmm/image_file.h"
#include "harvest/unit_hashes.h"

namespace {

struct Images {
  std::string dir;
  std::unique_ptr<vmsync::ImageFile> ram, disk, baseRam, baseDisk;
  Images() {
    char tmpl[] = "/tmp/vmsync-fuzz-XXXXXX";
    dir = ::mkdtemp(tmpl);
    ram = std::make_unique<vmsync::ImageFile>(dir + "/ram", true, 16 * vmsync::kUnitSize);
    disk = std::make_unique<vmsync::ImageFile>(dir + "/disk", true, 8 * vmsync::kUnitSize);
    baseRam = std::make_unique<vmsync::ImageFile>(dir + "/base-ram", true, 16 * vmsync::kUnitSize);
    baseDisk = std::make_unique<vmsync::ImageFile>(dir + "/base-disk", true, 8 * vmsync::kUnitSize);
  }
  ~Images() { std::filesystem::remove_all(dir); }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Images images;
  if (size < 8) return 0;
  std::vector<capnp::word> words = vmsync::fuzz::inputWords(data, size);
  const capnp::ReaderOptions limits = vmsync::fuzz::inputLimits();
  auto before = vmsync::hashAllUnits(*images.ram);
  try {
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(words.data(), words.size()), limits);
    vmsync::applyCheckpoint(reader.getRoot<vmsync::wire::Checkpoint>(), *images.ram, *images.disk,
                            vmsync::BaseImage{images.baseRam.get(), images.baseDisk.get()});
  } catch (const vmsync::Error&) {
    // Rejected whole: nothing may have been written.
    if (vmsync::hashAllUnits(*images.ram) != before) __builtin_trap();
  } catch (const kj::Exception&) {
    if (vmsync::hashAllUnits(*images.ram) != before) __builtin_trap();
  }
  return 0;
}

// Mutants as Checkpoint messages (see checkpoint_mutator.h).
extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size, std::size_t maxSize,
                                               unsigned int seed) {
  return vmsync::fuzz::mutateCheckpointInput(data, size, maxSize, seed);
}
