// A loop device over an image file, released when its owner goes.
#pragma once

#include <string>

namespace vmsync {

/// Attaches `backingFile` to a free /dev/loopN (LOOP_CONFIGURE, autoclear) and
/// detaches it on destruction. Throws Error naming the file on failure.
class LoopDevice {
 public:
  explicit LoopDevice(const std::string& backingFile);
  ~LoopDevice();
  LoopDevice(const LoopDevice&) = delete;
  LoopDevice& operator=(const LoopDevice&) = delete;

  /// "/dev/loopN".
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

}  // namespace vmsync
