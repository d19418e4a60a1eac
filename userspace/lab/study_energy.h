// `vmsync study`'s energy accounting: what each policy at each interval
// costs a phone per minute on each emulated link (bytes, CPU, joules).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/energy_model.h"

namespace vmsync {

/// One checkpoint of the study as a device would push it: at `timeSeconds`
/// of the run, `bytes` on the wire, `cpuSeconds` to harvest and encode it.
struct StudyPush {
  double timeSeconds = 0;
  std::uint64_t bytes = 0;
  double cpuSeconds = 0;
};

/// policy -> interval (s) -> its pushes in the order of the run.
using StudyPushes = std::map<std::string, std::map<std::uint32_t, std::vector<StudyPush>>>;

/// What one policy at one interval costs per minute of the run on one link.
struct StudyEnergyRow {
  std::string policy;
  std::uint32_t intervalSeconds = 0;
  std::string link;  // a profile of the network lab with a radio model: wifi, lte, 3g
  double bytesPerMinute = 0;
  double cpuSecondsPerMinute = 0;
  EnergyBreakdown joulesPerMinute;
  double linkBusy = 0;  // fraction of the run the link spent moving the pushes
};

/// The links the study prices, in the order of its tables.
const std::vector<std::string>& studyEnergyLinks();

/// Every policy and interval of `pushes` on every link: each push goes up at
/// the link profile's uplink rate, priced by the link's radio model, its CPU
/// at a phone core's power; per minute of `measuredSeconds`. The tail after
/// the last push is counted for one more interval (where the next push would
/// come), not to its end.
std::vector<StudyEnergyRow> studyEnergy(const StudyPushes& pushes, double measuredSeconds);

/// Writes `energy.csv` in `outDir` (the median over `runs` of every field)
/// and draws `energy_<link>.png` for each link (bytes and joules per minute
/// against the interval, one line per policy). Returns the report's section
/// in Markdown.
std::string writeStudyEnergy(const std::string& outDir, const std::string& workload,
                             const std::vector<std::vector<StudyEnergyRow>>& runs);

}  // namespace vmsync
