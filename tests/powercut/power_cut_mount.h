// A power-cut file system (power_cut_fs.h) mounted for a test: the process
// that serves it, and the cut() that throws away what was not made durable.
#pragma once

#include <memory>
#include <string>

#include "power_cut_fs.h"
#include "test_env.h"

namespace vmsync::testing {

class PowerCutMount {
 public:
  /// Mounts at `at` (made if missing); its log goes to `at` + ".log".
  explicit PowerCutMount(std::string at);
  ~PowerCutMount();
  PowerCutMount(const PowerCutMount&) = delete;
  PowerCutMount& operator=(const PowerCutMount&) = delete;

  /// Empty once mounted, else why it is not (no /dev/fuse, not root, ...).
  const std::string& missing() const { return missing_; }
  const std::string& path() const { return at_; }

  /// The power cut. Every process that wrote here must be dead first (a
  /// real cut takes them too). Throws vmsync::Error when the file system
  /// does not answer.
  PowerCutReport cut();
  /// What a cut now would throw away.
  PowerCutReport unsynced();

 private:
  PowerCutReport ask(const std::string& command);

  std::string at_;
  std::string control_;
  std::string missing_;
  std::unique_ptr<Process> server_;
};

}  // namespace vmsync::testing
