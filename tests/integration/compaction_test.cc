// Compaction under load: the server folds the chain into a new base while the
// active device keeps pushing; the data directory stays bounded over 200
// checkpoints, and a standby that was offline across folds catches up from the
// base and takes over with matching digests.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <regex>

#include "chaos.h"
#include "cluster.h"
#include "power_cut_mount.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

constexpr auto kBootAndSync = std::chrono::seconds(180);
constexpr std::uint64_t kCompactAfter = 20;
constexpr std::uint64_t kCheckpoints = 200;

struct DirSizes {
  std::uint64_t total = 0;    // disk space of every file in the data directory
  std::uint64_t largestBase = 0;
  std::uint64_t largestCheckpoint = 0;
};

DirSizes measure(const std::string& dir) {
  DirSizes sizes;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;  // removed while listed
    // Space taken, not length: compaction's scratch images are sparse.
    sizes.total += static_cast<std::uint64_t>(st.st_blocks) * 512;
    const auto bytes = static_cast<std::uint64_t>(st.st_size);
    const std::string name = it->path().filename().string();
    if (name.ends_with(".base") || name == "00000000000000000001.ckpt") {
      sizes.largestBase = std::max(sizes.largestBase, bytes);
    } else if (name.ends_with(".ckpt")) {
      sizes.largestCheckpoint = std::max(sizes.largestCheckpoint, bytes);
    }
  }
  return sizes;
}

class Compaction : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

TEST_F(Compaction, DataDirectoryStaysBoundedAndADeviceBehindTheFoldTakesOver) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer({"--compact-after", std::to_string(kCompactAfter)});
  cluster.startActive("A", {"--interval", "0.1"});
  cluster.startStandby("B");
  cluster.startStandby("C");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B") << cluster.logOf("C");
  // C goes offline and stays away across several folds.
  cluster.stopDevice("C");
  const std::uint64_t cLeftAt = cluster.head();

  const std::string data = dir.path() + "/server";
  DirSizes peak;
  std::uint64_t largestBase = 0, largestCheckpoint = 0;
  ASSERT_TRUE(waitFor(
      [&] {
        DirSizes now = measure(data);
        peak.total = std::max(peak.total, now.total);
        largestBase = std::max(largestBase, now.largestBase);
        largestCheckpoint = std::max(largestCheckpoint, now.largestCheckpoint);
        return cluster.head() >= kCheckpoints;
      },
      std::chrono::seconds(600)))
      << "the chain did not reach " << kCheckpoints << cluster.logOf("A") << cluster.logOf("server");

  const std::string serverLog = readFile(dir.path() + "/server.log");
  static const std::regex folded(R"(compaction: the base is now checkpoint (\d+))");
  const auto folds = std::distance(std::sregex_iterator(serverLog.begin(), serverLog.end(), folded),
                                   std::sregex_iterator());
  // Stated bound: the base and the fold being written (two bases), the
  // checkpoints that wait for the next fold, plus ten pushed while a fold runs,
  // plus 1 MiB for the state file and directories.
  const std::uint64_t bound = 2 * largestBase + (kCompactAfter + 10) * largestCheckpoint + (1u << 20);
  std::printf("%llu checkpoints, %lld folds; data directory peaked at %llu bytes (bound %llu: base %llu, "
              "largest checkpoint %llu)\n",
              static_cast<unsigned long long>(cluster.head()), static_cast<long long>(folds),
              static_cast<unsigned long long>(peak.total), static_cast<unsigned long long>(bound),
              static_cast<unsigned long long>(largestBase), static_cast<unsigned long long>(largestCheckpoint));
  // A fold goes no further than the online standbys have applied, and none
  // starts while one runs: how many there are follows the machine's speed.
  // Three show that compaction keeps coming back; the bound below is the point.
  EXPECT_GE(folds, 3) << "the chain was hardly compacted";
  EXPECT_LE(peak.total, bound) << "the data directory grew past its bound";
  EXPECT_EQ(serverLog.find("compaction at"), std::string::npos) << "a fold failed" << cluster.logOf("server");

  // C comes back behind the base and the switch to it comes at once: the
  // server catches C up from the base first (the VM runs on meanwhile), then
  // hands over.
  cluster.startStandby("C");
  ASSERT_TRUE(cluster.waitForDevice("C", 0, std::chrono::seconds(30))) << cluster.logOf("C");  // registered again
  std::printf("C left at checkpoint %llu and came back after %lld folds\n", static_cast<unsigned long long>(cLeftAt),
              static_cast<long long>(folds));
  // What the chain would hold without compaction: every checkpoint A pushed.
  static const std::regex stored(R"(A: checkpoint \d+ \(\w+\) stored: \d+ pages, \d+ blocks, (\d+) bytes)");
  const std::string activeLog = readFile(dir.path() + "/A.log");
  std::uint64_t pushed = 0;
  for (std::sregex_iterator it(activeLog.begin(), activeLog.end(), stored), end; it != end; ++it)
    pushed += std::stoull((*it)[1]);
  std::printf("A pushed %llu bytes of chunks in all; the data directory peaked at %llu bytes\n",
              static_cast<unsigned long long>(pushed), static_cast<unsigned long long>(peak.total));

  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("C", &report, &output), 0)
      << output << cluster.logOf("A") << cluster.logOf("C") << cluster.logOf("server");
  EXPECT_EQ(report["to"], "C");  // C verified the final digest before resuming
  EXPECT_NE(readFile(dir.path() + "/server.log").find("catch-up for C: checkpoints"), std::string::npos)
      << "C was not caught up from the base in one merge" << cluster.logOf("server");
  std::printf("switch to C: caught up first in %.0f ms (%llu bytes), paused %.0f ms; progress shown:\n%s",
              report["catch_up_ms"].get<double>(), static_cast<unsigned long long>(report["catch_up_bytes"]),
              report["total_ms"].get<double>() - report["catch_up_ms"].get<double>(),
              report["progress"].get<std::string>().c_str());
  // B followed every fold online; it takes over from C too.
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0)
      << output << cluster.logOf("B") << cluster.logOf("C") << cluster.logOf("server");
  EXPECT_EQ(report["to"], "B");
}

TEST_F(Compaction, PowerCutDuringAFoldRecoversAWholeChain) {
  TempDir dir;
  // The server's data directory keeps only what was fsynced (tests/powercut).
  PowerCutMount disk(dir.path() + "/server");
  if (!disk.missing().empty()) VMSYNC_SKIP_OR_FAIL(disk.missing());
  Cluster cluster(dir.path());
  const std::vector<std::string> compact = {"--compact-after", "6"};
  cluster.startServer(compact);
  cluster.startActive("A", {"--interval", "0.3"});
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");

  const std::string chain = dir.path() + "/server/vms/owner/vm/checkpoints";
  for (const char* point : {"fold-before-write", "fold-before-commit"}) {
    SCOPED_TRACE(point);
    // The test hook: the server SIGKILLs itself at `point` of its next fold.
    ::setenv("VMSYNC_CRASH_AT", point, 1);
    cluster.startServer(compact);
    ::unsetenv("VMSYNC_CRASH_AT");
    ASSERT_TRUE(waitFor([&] { return !cluster.server().running(); }, std::chrono::seconds(120)))
        << "the server did not reach " << point << cluster.logOf("server");
    ASSERT_NE(readFile(dir.path() + "/server.log").find(std::string("VMSYNC_CRASH_AT=") + point), std::string::npos);
    const PowerCutReport cut = disk.cut();
    disk.restore();
    std::vector<std::string> left;
    for (const auto& e : fs::directory_iterator(chain)) left.push_back(e.path().filename().string());
    std::sort(left.begin(), left.end());
    std::printf("power cut at %-18s (%s): %zu files in the chain, %s scratch space\n", point, describe(cut).c_str(),
                left.size(),
                fs::exists(dir.path() + "/server/vms/owner/vm/compaction") ? "with" : "without");

    // Restarted without folding: a new fold would make its own scratch space
    // and .tmp base, which the checks below would take for leftovers (seen
    // on a loaded machine, where the fold lasts long enough to be caught).
    cluster.startServer();
    // A VM with a damaged record is out of service: that the server answers for it is the check.
    ASSERT_TRUE(cluster.status()) << "the server did not come back" << cluster.logOf("server");
    EXPECT_FALSE(fs::exists(dir.path() + "/server/vms/owner/vm/compaction")) << "scratch space survived the restart";
    // Whole or absent: killed before the new base was written, the old chain
    // stands; killed after, the new base stands and what it replaced is gone.
    std::uint64_t newestBase = 0, oldestCheckpoint = UINT64_MAX;
    for (const auto& e : fs::directory_iterator(chain)) {
      const std::string name = e.path().filename().string();
      EXPECT_FALSE(name.ends_with(".tmp")) << name;
      if (name.ends_with(".base")) newestBase = std::max<std::uint64_t>(newestBase, std::stoull(name));
      if (name.ends_with(".ckpt")) oldestCheckpoint = std::min<std::uint64_t>(oldestCheckpoint, std::stoull(name));
    }
    if (std::string(point) == "fold-before-commit") {
      EXPECT_GT(newestBase, 0u) << "the fold written before the kill was lost";
      EXPECT_GT(oldestCheckpoint, newestBase) << "checkpoints the new base replaced were kept";
    }
    // Every checkpoint A was told is stored is there by digest, or in the base.
    const ChaosResult stored = checkAcknowledged(dir.path());
    for (const auto& f : stored.failures) ADD_FAILURE() << f;
    EXPECT_EQ(stored.lost, 0u);
    EXPECT_GE(stored.checkedByDigest + stored.folded, 3u) << "fewer acknowledgements found than the chain had";
    const std::uint64_t head = cluster.head();
    ASSERT_TRUE(cluster.waitForHead(head + 3, std::chrono::seconds(90)))
        << cluster.logOf("server") << cluster.logOf("A") << cluster.logOf("B");
  }
  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0)
      << output << cluster.logOf("A") << cluster.logOf("B") << cluster.logOf("server");
  EXPECT_EQ(report["to"], "B");  // B's image matched A's digest at the switch
}

}  // namespace
}  // namespace vmsync::testing
