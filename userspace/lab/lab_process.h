// What the benchmarks share: a child process with its output in a log file,
// this program's own path, and percentiles.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace vmsync {

/// A child process (a server or a device daemon) with its output in a log
/// file; SIGTERM, then SIGKILL after 20 s, when it goes. It gets SIGTERM
/// too when the process that started it dies.
class Child {
 public:
  Child(const std::vector<std::string>& argv, const std::string& logPath);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  pid_t pid() const { return pid_; }
  bool running();
  /// CPU time the process has used so far (user + system), in seconds.
  double cpuSeconds() const;
  /// Its resident memory now, in bytes (0 once it is gone).
  std::uint64_t residentBytes() const;

 private:
  pid_t pid_ = -1;
};

/// This program's path, read once: should the binary be rebuilt during a
/// bench, /proc/self/exe names the old file with " (deleted)" after it, which
/// nothing can run.
const std::string& selfBinary();

/// Nearest-rank percentile of `values` (p in 0..100); NaN when there are none.
double percentile(std::vector<double> values, double p);

}  // namespace vmsync
