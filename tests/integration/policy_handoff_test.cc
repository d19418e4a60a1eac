// A handoff under each checkpoint policy ends with a verified image (the target
// checks the digest before resuming) and a counter that goes on.
#include <gtest/gtest.h>

#include "cluster.h"

namespace vmsync::testing {
namespace {

class PolicyHandoff : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

TEST_P(PolicyHandoff, SwitchThereAndBackWithVerifiedImages) {
  const std::string policy = GetParam();
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  const bool orig = policy.ends_with("-orig");
  // An Orig checkpoint carries every unit that differs from the base, and a
  // standby compares its whole image at each: every 2 s, not 1 s, is enough
  // to make the point and halves what the test costs the machine.
  const std::string interval = orig ? "2" : "1";
  cluster.startActive("A", {"--policy", policy, "--interval", interval});
  cluster.startStandby("B", {"--interval", interval});
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 5; },
                      std::chrono::seconds(180)))
      << cluster.logOf("A");
  // Under Orig a device that joins late needs the base and the latest checkpoint only.
  const std::uint64_t joinedAt = cluster.head();
  if (orig) {
    ASSERT_GE(joinedAt, 3u);
    cluster.startStandby("C", {"--interval", interval});
  }
  ASSERT_TRUE(cluster.waitForHead(joinedAt + 2, std::chrono::seconds(60))) << cluster.logOf("A");

  std::string aLog;
  ASSERT_NO_FATAL_FAILURE(cluster.switchAndWatchTheCounter("A", "B", &aLog));

  const std::string target = orig ? "C" : "A";
  ASSERT_TRUE(cluster.waitForHead(cluster.head() + 2, std::chrono::seconds(60))) << cluster.logOf("B");
  nlohmann::json report;
  std::string output;
  std::string why;
  ASSERT_EQ(cluster.switchTo(target, &report, &output), 0) << output << cluster.logOf("B") << cluster.logOf(target);
  const std::string bLog = readFile(cluster.serialLog("B"));
  const std::string before = target == "A" ? aLog : "";
  ASSERT_TRUE(waitFor(
      [&] { return counterValues(readFile(cluster.serialLog(target)).substr(before.size())).size() >= 3; },
      std::chrono::seconds(60)))
      << cluster.logOf(target);
  EXPECT_TRUE(consecutive(counterValues(aLog + bLog + readFile(cluster.serialLog(target)).substr(before.size())), &why))
      << why;
  if (orig) {
    const std::string cLog = readFile(dir / "C.log");
    EXPECT_NE(cLog.find("applied checkpoint 1 "), std::string::npos) << cLog;
    EXPECT_EQ(cLog.find("applied checkpoint 2 "), std::string::npos)
        << "C joined at checkpoint " << joinedAt << " and should have skipped to the latest\n" << cLog;
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, PolicyHandoff,
                         ::testing::Values("dirty-prev", "diff-prev", "dirty-orig", "diff-orig"),
                         [](const auto& info) {
                           std::string name = info.param;
                           name.erase(std::remove(name.begin(), name.end(), '-'), name.end());
                           return name;
                         });

}  // namespace
}  // namespace vmsync::testing
