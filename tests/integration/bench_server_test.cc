// `vmsync bench server` in short: synthetic devices over TLS against a real
// server process store every push and have it forwarded to the followers,
// without errors, the runs are plotted beside the JSON results, and a sweep
// stops at the VM count where p99 push latency passes the knee. (The figures
// themselves are for docs/benchmarks.md, not for pass/fail.)
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "plot_check.h"
#include "test_env.h"

namespace vmsync::testing {
namespace {

TEST(BenchServer, AShortRunStoresAndForwardsEveryPushWithoutErrors) {
  TempDir dir;
  std::string out;
  ASSERT_EQ(run({vmsyncBinary(), "--log-level", "warn", "bench", "server", "--vms", "3", "--devices", "3",
                 "--seconds", "4", "--image-mb", "4", "--dir", dir.path() + "/bench", "--json",
                 dir.path() + "/result.json"},
                &out),
            0)
      << out;
  const auto result = nlohmann::json::parse(readFile(dir.path() + "/result.json"));
  ASSERT_EQ(result["runs"].size(), 1u) << result.dump(2);
  const auto& r = result["runs"][0];
  EXPECT_EQ(r["vms"], 3);
  EXPECT_EQ(r["errors"], 0u) << r.dump(2);
  // Three VMs pushing every second for four seconds, give or take a tick at either end.
  const auto pushes = r["pushes"].get<std::uint64_t>();
  EXPECT_GE(pushes, 9u) << r.dump(2);
  EXPECT_LE(pushes, 18u) << r.dump(2);
  // Each stored push went to both followers (those under way at the end of the window aside).
  const auto forwards = r["forwards"].get<std::uint64_t>();
  EXPECT_GE(forwards, 2 * pushes - 2 * 3) << r.dump(2);
  EXPECT_LE(forwards, 2 * pushes + 2 * 3) << r.dump(2);
  EXPECT_GT(r["push_ms_p50"].get<double>(), 0.0);
  EXPECT_GE(r["push_ms_p99"].get<double>(), r["push_ms_p50"].get<double>());
  EXPECT_GT(r["lag_ms_p50"].get<double>(), 0.0);
  EXPECT_GT(r["server_rss_mib"].get<double>(), 1.0);
  // 200 KiB of random bytes a push, which lz4 cannot shrink.
  EXPECT_GT(r["stored_mib_per_s"].get<double>(), 3 * 0.15);
  EXPECT_NE(out.find("VMs  ckpt/s"), std::string::npos) << out;
  // Without gnuplot the sweep test below checks what the bench says.
  if (auto missing = missingForPlots(); !missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  expectPlot(out, dir.path() + "/result.png");
}

// Run with no gnuplot on its PATH, which costs the sweep its plot, not its results.
TEST(BenchServer, ASweepStopsWhereP99PushLatencyPassesTheKneeAndWithoutGnuplotSaysWhyItHasNoPlot) {
  TempDir dir;
  std::string out;
  // A knee no push can stay under: the sweep ends after its first count.
  ASSERT_EQ(run({"env", "PATH=" + dir.path(), vmsyncBinary(), "--log-level", "warn", "bench", "server", "--vms",
                 "2,3", "--devices", "2",
                 "--seconds", "2", "--image-mb", "4", "--knee-ms", "0.001", "--dir", dir.path() + "/bench",
                 "--json", dir.path() + "/result.json"},
                &out),
            0)
      << out;
  const auto result = nlohmann::json::parse(readFile(dir.path() + "/result.json"));
  EXPECT_EQ(result["runs"].size(), 1u) << result.dump(2);
  EXPECT_EQ(result["knee_vms"], 2) << result.dump(2);
  EXPECT_NE(out.find("p99 push latency passed 0 ms at 2 VMs"), std::string::npos) << out;
  EXPECT_NE(out.find("no plots: gnuplot is not installed"), std::string::npos) << out;
  EXPECT_EQ(out.find("plot: "), std::string::npos) << out;
  // The script waits beside the results, to be drawn where gnuplot is.
  EXPECT_NE(readFile(dir.path() + "/result.gp").find("set output"), std::string::npos);
}

}  // namespace
}  // namespace vmsync::testing
