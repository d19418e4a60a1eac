// A short feasibility study on a real guest: the outputs exist and the numbers
// are consistent with each other, the energy accounting's with the
// checkpoints it prices.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <sstream>
#include <tuple>

#include "cluster.h"
#include "plot_check.h"

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
  missing = missingForPlots();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  std::string out;
  TempDir dir;
  const std::string result = dir / "study";
  ASSERT_EQ(run({vmsyncBinary(), "study", "--workload", "counter", "--image", guestImage(), "--duration", "15",
                 "--intervals", "1,5", "--out", result, "--accel", "tcg", "--no-progress"},
                &out),
            0)
      << out;
  for (const char* f : {"checkpoints.csv", "summary.csv", "report.md", "energy.csv"})
    EXPECT_GT(fs::exists(result + "/" + f) ? fs::file_size(result + "/" + f) : 0, 0u) << f;
  for (const char* png : {"checkpoint_size.png", "total_bytes.png", "energy_wifi.png", "energy_lte.png",
                          "energy_3g.png"})
    expectPlot(out, result + "/" + png);

  auto rows = readCsv(result + "/checkpoints.csv");
  ASSERT_GT(rows.size(), 1u);
  // 15 checkpoints at 1 s and 3 at 5 s, each under four policies.
  EXPECT_EQ(rows.size() - 1, (15u + 3u) * 4u);
  for (std::size_t i = 1; i < rows.size(); ++i) {
    const auto& r = rows[i];
    ASSERT_EQ(r.size(), 11u);
    const auto pages = std::stoull(r[5]), changed = std::stoull(r[6]), encoded = std::stoull(r[7]);
    EXPECT_LE(changed, pages * 4096) << "row " << i;
    if (r[4].starts_with("dirty")) {
      EXPECT_LE(encoded, pages * 4096) << "row " << i;
    }
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
  EXPECT_NE(report.find("Energy per minute on each link"), std::string::npos);

  // What the energy table prices is what the checkpoints cost: per policy and
  // interval, the lz4 bytes and the CPU of its checkpoints, per minute.
  std::map<std::pair<std::string, std::string>, std::pair<double, double>> perCheckpoint;  // bytes, CPU ms
  for (std::size_t i = 1; i < rows.size(); ++i) {
    auto& sum = perCheckpoint[{rows[i][4], rows[i][2]}];
    sum.first += std::stod(rows[i][8]);
    sum.second += std::stod(rows[i][9]) + std::stod(rows[i][10]);
  }
  auto energy = readCsv(result + "/energy.csv");
  ASSERT_EQ(energy.size(), 1u + 4u * 2u * 3u);  // policies x intervals x links (wifi, lte, 3g)
  ASSERT_EQ(energy[0].size(), 13u);
  EXPECT_EQ(energy[0][10], "total_j_per_min");
  const double minutes = 15.0 / 60;
  std::map<std::tuple<std::string, std::string, std::string>, std::vector<std::string>> byKey;
  for (std::size_t i = 1; i < energy.size(); ++i) {
    const auto& e = energy[i];
    ASSERT_EQ(e.size(), 13u) << "row " << i;
    byKey[{e[0], e[1], e[2]}] = e;
    const auto& sum = perCheckpoint.at({e[0], e[1]});
    EXPECT_NEAR(std::stod(e[3]), sum.first / minutes, 1.0) << "bytes per minute, row " << i;
    EXPECT_NEAR(std::stod(e[4]), sum.second / 1000 / minutes, 0.01) << "CPU per minute, row " << i;
    const double promotion = std::stod(e[5]), transfer = std::stod(e[6]), tail = std::stod(e[7]);
    const double cpu = std::stod(e[8]), radio = std::stod(e[9]), total = std::stod(e[10]);
    EXPECT_GT(promotion, 0) << "row " << i;
    // A link that carries the pushes has idle time for a tail; one that
    // cannot (3g at short intervals) is still sending when the run ends.
    if (std::stod(e[11]) < 0.9) {
      EXPECT_GT(tail, 0) << "row " << i;
    }
    EXPECT_GE(tail, 0) << "row " << i;
    EXPECT_NEAR(radio, promotion + transfer + tail, 0.01) << "row " << i;
    EXPECT_NEAR(total, radio + cpu, 0.01) << "row " << i;
  }
  for (const auto& [key, wifi] : byKey) {
    if (std::get<2>(key) != "wifi") continue;
    const auto& lte = byKey.at({std::get<0>(key), std::get<1>(key), "lte"});
    // LTE's tail (1.06 W for 11.6 s) outweighs WiFi's (0.12 W for 0.24 s),
    // and it keeps the radio connected between pushes that WiFi reconnects for.
    EXPECT_GT(std::stod(lte[9]), std::stod(wifi[9])) << std::get<0>(key) << " every " << std::get<1>(key) << " s";
    EXPECT_GE(std::stod(wifi[12]), std::stod(lte[12])) << std::get<0>(key) << " every " << std::get<1>(key) << " s";
  }
}

}  // namespace
}  // namespace vmsync::testing
