// Shared helpers for tests that start real processes (server, devices, QEMU).
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

namespace vmsync::testing {

/// True when VMSYNC_REQUIRE_ALL=1: a missing feature fails the test instead of skipping it.
bool requireAll();

/// Skips the current test with `reason`, or fails it under VMSYNC_REQUIRE_ALL=1.
#define VMSYNC_SKIP_OR_FAIL(reason)                                                  \
  do {                                                                               \
    if (::vmsync::testing::requireAll()) FAIL() << "required feature missing: " << (reason); \
    GTEST_SKIP() << (reason);                                                        \
  } while (0)

/// A temporary directory removed with everything in it.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

/// An empty file system of `type` (xfs, btrfs: what mkfs.TYPE makes) from a
/// loop device over a sparse file, mounted at a directory until it goes; or
/// the reason there cannot be one here (not root, not in the kernel, no mkfs
/// for it). For what differs between file systems: XFS lets io_uring complete
/// buffered writes inline, ext4, tmpfs and btrfs do not.
class LoopMount {
 public:
  /// Mounts at `at`, made if missing.
  LoopMount(std::string type, std::string at);
  ~LoopMount();
  LoopMount(const LoopMount&) = delete;
  LoopMount& operator=(const LoopMount&) = delete;

  /// Empty once mounted, else why it is not.
  const std::string& missing() const { return missing_; }
  const std::string& path() const { return at_; }
  std::string operator/(const std::string& name) const { return at_ + "/" + name; }

 private:
  TempDir backing_;
  std::string at_;
  std::string missing_;
};

/// A child process with stdout+stderr in a log file; SIGTERM then SIGKILL on destruction.
class Process {
 public:
  Process(std::vector<std::string> argv, std::string logPath);
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  bool running();
  /// Sends SIGTERM and waits up to `grace`; SIGKILL after. Returns the exit status.
  int stop(std::chrono::milliseconds grace = std::chrono::seconds(20));
  /// Sends SIGKILL and reaps.
  void kill();
  const std::string& logPath() const { return logPath_; }
  /// The wait status once the process is gone (see waitpid), else 0.
  int status() const { return status_; }

 private:
  pid_t pid_ = -1;
  int status_ = 0;
  std::string logPath_;
};

/// Runs a command to completion; returns exit status and fills `output` with
/// stdout and stderr, or with stdout alone when `errors` takes stderr.
int run(const std::vector<std::string>& argv, std::string* output, std::string* errors = nullptr);

/// Polls `condition` every `poll` until it holds or `timeout` passes.
bool waitFor(const std::function<bool()>& condition, std::chrono::milliseconds timeout,
             std::chrono::milliseconds poll = std::chrono::milliseconds(100));

/// Reads a whole file ("" if absent).
std::string readFile(const std::string& path);

/// A TCP port on 127.0.0.1 that was free a moment ago.
int freePort();

/// Path of the vmsync binary under test, and of the guest images `make test`
/// builds: the counter guest (env VMSYNC_IMAGE) and the video guest (env
/// VMSYNC_VIDEO_IMAGE).
std::string vmsyncBinary();
std::string guestImage();
std::string videoImage();

/// Checks for QEMU and a guest image; empty when present, else the reason.
std::string missingForVm(const std::string& image = guestImage());

}  // namespace vmsync::testing
