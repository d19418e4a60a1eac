#include "chain_image.h"

#include <filesystem>

#include "base/error.h"
#include "base/units.h"
#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_record.h"

namespace vmsync {

namespace fs = std::filesystem;

kj::Own<StoredCheckpoint> readCheckpointFile(const std::string& path, const char* what) {
  std::string why;
  KJ_IF_MAYBE(words, readRecordFile(path, why)) { return kj::refcounted<StoredCheckpoint>(kj::mv(*words)); }
  fail("cannot {} from {}: {}", what, path, why);
}

ChainImage::ChainImage(const std::string& basePath, std::string scratchDir, const char* what)
    : dir_(std::move(scratchDir)) {
  fs::remove_all(dir_);
  fs::create_directories(dir_);
  try {
    base_ = readCheckpointFile(basePath, what);
    auto base = base_->reader();
    if (base.getKind() != wire::CheckpointKind::FULL || !base.hasSpec())
      fail("cannot {}: {} is not a full checkpoint", what, basePath);
    auto spec = base.getSpec();
    if (spec.getMemoryBytes() == 0 || spec.getMemoryBytes() % kUnitSize || spec.getDiskBytes() == 0 ||
        spec.getDiskBytes() % kUnitSize)
      fail("cannot {}: the base {} has invalid image sizes", what, basePath);
    ram_ = std::make_unique<ImageFile>(dir_ + "/ram.img", true, spec.getMemoryBytes());
    disk_ = std::make_unique<ImageFile>(dir_ + "/disk.img", true, spec.getDiskBytes());
    applyCheckpoint(base, *ram_, *disk_);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(dir_, ec);
    throw;
  }
}

ChainImage::~ChainImage() {
  ram_.reset();
  disk_.reset();
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

}  // namespace vmsync
