// The chain's image materialized in a scratch directory, from its base: what
// a fold and a resync both start from.
#pragma once

#include <kj/memory.h>

#include <memory>
#include <string>

#include "checkpoint_store.h"
#include "vmm/image_file.h"

namespace vmsync {

/// Reads the checkpoint record at `path`. Throws Error "cannot <what> from
/// <path>: <why>" when it is missing or damaged.
kj::Own<StoredCheckpoint> readCheckpointFile(const std::string& path, const char* what);

/// Empties `scratchDir`, reads the full checkpoint at `basePath` (checked to
/// be full, with valid image sizes) and applies it to new RAM and disk images
/// there. `what` ("fold", "resync") names the work in errors. The scratch
/// directory goes with the object.
class ChainImage {
 public:
  ChainImage(const std::string& basePath, std::string scratchDir, const char* what);
  ~ChainImage();
  ChainImage(const ChainImage&) = delete;
  ChainImage& operator=(const ChainImage&) = delete;

  wire::Checkpoint::Reader base() { return base_->reader(); }
  ImageFile& ram() { return *ram_; }
  ImageFile& disk() { return *disk_; }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  kj::Own<StoredCheckpoint> base_;
  std::unique_ptr<ImageFile> ram_;
  std::unique_ptr<ImageFile> disk_;
};

}  // namespace vmsync
