// Helpers for the bpf block source tests: skip-or-fail, scratch image files,
// loop devices, block hashes.
#pragma once

#include "vmm/loop_device.h"

#include <gtest/gtest.h>
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace vmsync::bpftest {

/// True when VMSYNC_REQUIRE_ALL=1: a missing feature is then a failure.
bool requireAll();

/// Skips the test with `reason`, or fails it under VMSYNC_REQUIRE_ALL=1.
#define BPFTEST_SKIP_OR_FAIL(reason)                                                      \
  do {                                                                                    \
    if (::vmsync::bpftest::requireAll()) FAIL() << (reason) << " (VMSYNC_REQUIRE_ALL=1)"; \
    GTEST_SKIP() << (reason);                                                             \
  } while (0)

/// A file of `bytes` random bytes in a fresh temporary directory, removed
/// with the directory on destruction.
class ScratchImage {
 public:
  explicit ScratchImage(std::uint64_t bytes);
  ~ScratchImage();
  ScratchImage(const ScratchImage&) = delete;
  ScratchImage& operator=(const ScratchImage&) = delete;
  const std::string& path() const { return path_; }
  std::uint64_t bytes() const { return bytes_; }

 private:
  std::string directory_;
  std::string path_;
  std::uint64_t bytes_;
};

/// A loop device over a file, detached on destruction (and set to
/// autoclear, so that a crashed test does not leave it behind).
using vmsync::LoopDevice;

/// xxh3 of every 4096-byte block of a file.
std::vector<std::uint64_t> hashBlocks(const std::string& path);

/// Sends SIGTERM to a writer child and reaps it; returns its exit status.
int stopChild(pid_t pid);

}  // namespace vmsync::bpftest
