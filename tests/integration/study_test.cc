// A short feasibility study on a real guest: the outputs exist and the numbers
// are consistent with each other.
#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>

#include "cluster.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

std::vector<std::vector<std::string>> readCsv(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  std::stringstream in(readFile(path));
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> cells;
    std::stringstream l(line);
    std::string c;
    while (std::getline(l, c, ',')) cells.push_back(c);
    rows.push_back(cells);
  }
  return rows;
}

TEST(Study, ShortStudyWritesConsistentCsvReportAndPlots) {
  std::string missing = missingForVm();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  std::string out;
  if (run({"gnuplot", "--version"}, &out) != 0) VMSYNC_SKIP_OR_FAIL("gnuplot is not installed");
  TempDir dir;
  const std::string result = dir / "study";
  ASSERT_EQ(run({vmsyncBinary(), "study", "--workload", "counter", "--image", guestImage(), "--duration", "15",
                 "--intervals", "1,5", "--out", result, "--accel", "tcg", "--no-progress"},
                &out),
            0)
      << out;
  for (const char* f : {"checkpoints.csv", "summary.csv", "report.md", "checkpoint_size.png", "total_bytes.png"})
    EXPECT_GT(fs::exists(result + "/" + f) ? fs::file_size(result + "/" + f) : 0, 0u) << f;

  auto rows = readCsv(result + "/checkpoints.csv");
  ASSERT_GT(rows.size(), 1u);
  // 15 checkpoints at 1 s and 3 at 5 s, each under four policies.
  EXPECT_EQ(rows.size() - 1, (15u + 3u) * 4u);
  for (std::size_t i = 1; i < rows.size(); ++i) {
    const auto& r = rows[i];
    ASSERT_EQ(r.size(), 11u);
    const auto pages = std::stoull(r[5]), changed = std::stoull(r[6]), encoded = std::stoull(r[7]);
    EXPECT_LE(changed, pages * 4096) << "row " << i;
    if (r[4].starts_with("dirty")) EXPECT_LE(encoded, pages * 4096) << "row " << i;
  }

  auto summary = readCsv(result + "/summary.csv");
  ASSERT_EQ(summary.size(), 3u);
  for (std::size_t i = 1; i < summary.size(); ++i) {
    const double finalDirty = std::stod(summary[i][1]), finalDiff = std::stod(summary[i][2]);
    const double incrDirty = std::stod(summary[i][3]), incrDiff = std::stod(summary[i][4]);
    EXPECT_GT(incrDirty, 0);
    EXPECT_LE(finalDiff, finalDirty);
    EXPECT_LE(incrDiff, incrDirty);
    EXPECT_LE(finalDirty, incrDirty) << "syncing once cannot ship more whole pages than syncing every interval";
  }
  // Longer intervals coalesce rewrites of the same pages.
  EXPECT_LE(std::stod(summary[2][3]), std::stod(summary[1][3]));
  const std::string report = readFile(result + "/report.md");
  EXPECT_NE(report.find("Dirty Prev / Diff Prev"), std::string::npos);
  EXPECT_NE(report.find("CPU per checkpoint"), std::string::npos);
}

}  // namespace
}  // namespace vmsync::testing
