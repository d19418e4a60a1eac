// A power-cut file system (power_cut_fs.h) mounted for a test: the process
// that serves it, and the cut() that throws away what was not made durable.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "power_cut_fs.h"
#include "test_env.h"

namespace vmsync::testing {

class PowerCutMount {
 public:
  /// Mounts at `at` (made if missing); its log goes to `at` + ".powercut.log". With
  /// `keepContents`, what the mount shows when it goes is left in `at`
  /// (the tree is held in memory: without it, nothing remains). Each fsync
  /// takes `syncTime`.
  explicit PowerCutMount(std::string at, bool keepContents = false,
                         std::chrono::milliseconds syncTime = std::chrono::milliseconds(0));
  ~PowerCutMount();
  PowerCutMount(const PowerCutMount&) = delete;
  PowerCutMount& operator=(const PowerCutMount&) = delete;

  /// Empty when this host can mount one (root, /dev/fuse), else why not.
  static std::string unavailableReason();

  /// Empty once mounted, else why it is not (no /dev/fuse, not root, ...).
  const std::string& missing() const { return missing_; }
  const std::string& path() const { return at_; }

  /// The power cut, at this instant: what was not durable is gone, and every
  /// change from now on fails with EIO, a sync under way included, until
  /// restore(). Kill the processes that used the mount next (a real cut
  /// takes them too). Throws vmsync::Error when the file system does not
  /// answer.
  PowerCutReport cut();
  /// The power is back: waits up to 10 s for every process that used the
  /// mount to be gone, then lets changes through again. Throws
  /// vmsync::Error naming the processes that still use it.
  void restore();
  /// What a cut now would throw away.
  PowerCutReport unsynced();

 private:
  /// Sends one command, returns the answer line.
  std::string send(const std::string& command);
  PowerCutReport ask(const std::string& command);
  /// Processes with a file under the mount open or mapped, as "pid (name)".
  std::vector<std::string> users() const;

  std::string at_;
  std::string control_;
  std::string missing_;
  bool keepContents_;
  std::unique_ptr<Process> server_;
};

}  // namespace vmsync::testing
