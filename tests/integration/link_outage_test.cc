// Devices on their own hosts: the server and each device in a network
// namespace of its own behind an emulated mobile link, with the link taken
// down for real while checkpoints go on.
#include <gtest/gtest.h>

#include <regex>
#include <thread>

#include "cluster.h"

namespace vmsync::testing {
namespace {

constexpr auto kBootAndSync = std::chrono::seconds(240);

/// Image digests logged by `device` ("final checkpoint N stored (image digest X)"
/// on the source, "final checkpoint N: image digest X verified" on the target), by sequence.
std::map<std::uint64_t, std::string> loggedDigests(const std::string& log, const std::string& device) {
  static const std::regex line(R"((\S+): final checkpoint (\d+)(?: stored \(|: )image digest ([0-9a-f]+))");
  std::map<std::uint64_t, std::string> digests;
  for (std::sregex_iterator it(log.begin(), log.end(), line), end; it != end; ++it)
    if ((*it)[1] == device) digests[std::stoull((*it)[2])] = (*it)[3];
  return digests;
}

class LinkOutage : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (missing.empty()) missing = missingForNetworkLab();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }

  /// Starts the server, A active on `linkA` and B standby on `linkB`, each in
  /// its own namespace, and waits for the full sync, two checkpoints after it,
  /// and the guest counting on A.
  void startCounting(Cluster& cluster, const char* linkA, const char* linkB) {
    cluster.useNetworkLab();
    cluster.setLink("A", linkA);
    cluster.setLink("B", linkB);
    cluster.startServer();
    cluster.startActive("A", {"--block-source", "scan"});
    cluster.startStandby("B", {"--block-source", "scan"});
    ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
    ASSERT_TRUE(
        waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 5; }, kBootAndSync))
        << "the guest on A is not counting" << cluster.logOf("A");
  }

  /// Switches to `target` and checks that the VM goes on there where it
  /// stopped, and that the digest the source shipped is the one the target verified.
  void switchAndCheck(Cluster& cluster, const std::string& dir, const std::string& source, const std::string& target) {
    nlohmann::json report;
    std::string output;
    ASSERT_EQ(cluster.switchTo(target, &report, &output), 0)
        << output << cluster.logOf(source) << cluster.logOf(target) << cluster.logOf("server");
    const std::string sourceSerial = readFile(cluster.serialLog(source));  // paused now
    const std::uint64_t finalSequence = report["final_sequence"];
    const auto shipped = loggedDigests(readFile(dir + "/" + source + ".log"), source);
    const auto verified = loggedDigests(readFile(dir + "/" + target + ".log"), target);
    ASSERT_TRUE(shipped.count(finalSequence)) << cluster.logOf(source);
    ASSERT_TRUE(verified.count(finalSequence)) << cluster.logOf(target);
    EXPECT_EQ(shipped.at(finalSequence), verified.at(finalSequence));
    ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog(target))).size() >= 3; },
                        std::chrono::seconds(60)))
        << "the guest does not count on " << target << cluster.logOf(target);
    std::string why;
    EXPECT_TRUE(consecutive(counterValues(sourceSerial + readFile(cluster.serialLog(target))), &why))
        << "counter not continuous across " << source << " -> " << target << ": " << why;
  }
};

TEST_F(LinkOutage, StandbyCutOffForThirtySecondsCatchesUpAndTakesOver) {
  TempDir dir;
  Cluster cluster(dir.path());
  ASSERT_NO_FATAL_FAILURE(startCounting(cluster, "wifi", "lte"));
  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("B")["applied_sequence"] == cluster.head(); },
                      std::chrono::seconds(60)))
      << cluster.logOf("B");

  const std::uint64_t before = cluster.head();
  cluster.setLinkUp("B", false);
  std::this_thread::sleep_for(std::chrono::seconds(30));
  // The checkpoints went on without B, which fell behind.
  const std::uint64_t during = cluster.head();
  EXPECT_GE(during, before + 10) << cluster.logOf("A");
  auto b = cluster.deviceStatus("B");
  ASSERT_FALSE(b.is_null());
  EXPECT_LT(b["applied_sequence"].get<std::uint64_t>(), during);
  cluster.setLinkUp("B", true);

  // B catches up to the head: missed checkpoints merged into one.
  ASSERT_TRUE(waitFor(
      [&] {
        auto d = cluster.deviceStatus("B");
        return !d.is_null() && d["state"] == "online" && d["applied_sequence"].get<std::uint64_t>() >= during;
      },
      std::chrono::seconds(120)))
      << cluster.logOf("B") << cluster.logOf("server");
  EXPECT_NE(readFile(dir / "server.log").find("catch-up for B: checkpoints"), std::string::npos)
      << cluster.logOf("server");

  switchAndCheck(cluster, dir.path(), "A", "B");
}

TEST_F(LinkOutage, ActiveCutOffMidPushLosesNothing) {
  TempDir dir;
  Cluster cluster(dir.path());
  ASSERT_NO_FATAL_FAILURE(startCounting(cluster, "lte", "wifi"));

  // Checkpoints go every second: the link drops under one on its way, and the
  // next one is sent into the dead link until the connection gives up.
  const std::size_t logBefore = readFile(dir / "A.log").size();
  cluster.setLinkUp("A", false);
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "A.log").find("not stored", logBefore) != std::string::npos; },
                      std::chrono::seconds(60)))
      << "no push failed while A was cut off" << cluster.logOf("A");
  std::this_thread::sleep_for(std::chrono::seconds(5));
  cluster.setLinkUp("A", true);
  const std::uint64_t afterCut = cluster.head();

  // A reconnects and goes on; B follows.
  ASSERT_TRUE(cluster.waitForHead(afterCut + 3, std::chrono::seconds(120)))
      << cluster.logOf("A") << cluster.logOf("server");
  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("B")["applied_sequence"] == cluster.head(); },
                      std::chrono::seconds(60)))
      << cluster.logOf("B");
  const std::string aLog = readFile(dir / "A.log").substr(logBefore);
  EXPECT_NE(aLog.find("reconnecting"), std::string::npos) << cluster.logOf("A");
  EXPECT_NE(aLog.find("registered with"), std::string::npos) << cluster.logOf("A");

  // What the failed push carried reached B through later checkpoints: the
  // digest of the final checkpoint, computed by A, is verified on B.
  switchAndCheck(cluster, dir.path(), "A", "B");
}

}  // namespace
}  // namespace vmsync::testing
