// `vmsync study`: the paper's feasibility study on a real workload, every
// checkpoint policy and interval computed from the same VM run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vmsync {

struct StudyOptions {
  std::string workload = "counter";        // name, for the report
  std::string imageDir;                    // guest image built for the workload
  std::string outDir = "study";            // CSV, Markdown and PNG output
  std::uint32_t durationSeconds = 60;      // measured time after the workload starts
  std::vector<std::uint32_t> intervals{1, 2, 5, 10, 30, 60};  // seconds
  std::uint32_t repeat = 1;                // independent VM runs
  std::string accel = "auto";
  std::string qemuBinary = "qemu-system-x86_64";
  bool progress = true;                    // progress bar on stderr
};

/// Runs the study; returns the process exit code. Throws Error on bad options.
int runStudy(const StudyOptions& options);

}  // namespace vmsync
