// Devices on their own hosts: the server and each device in a network
// namespace of its own behind an emulated mobile link, with the link taken
// down for real while checkpoints go on.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <ctime>
#include <regex>
#include <sstream>
#include <thread>

#include "chaos.h"
#include "cluster.h"
#include "lab/network_lab.h"

namespace vmsync::testing {
namespace {

constexpr auto kBootAndSync = std::chrono::seconds(240);
/// The dead-link timeout of the tests that cut a link mid push: the push
/// fails once the timeout passes, as it would after 20 s.
constexpr int kShortDeadLinkSeconds = 5;

/// Image digests logged by `device` ("final checkpoint N stored (image digest X)"
/// on the source, "final checkpoint N: image digest X verified" on the target), by sequence.
std::map<std::uint64_t, std::string> loggedDigests(const std::string& log, const std::string& device) {
  static const std::regex line(R"((\S+): final checkpoint (\d+)(?: stored \(|: )image digest ([0-9a-f]+))");
  std::map<std::uint64_t, std::string> digests;
  for (std::sregex_iterator it(log.begin(), log.end(), line), end; it != end; ++it)
    if ((*it)[1] == device) digests[std::stoull((*it)[2])] = (*it)[3];
  return digests;
}

/// Seconds since midnight of `t`, local time, as the daemons' log lines show it.
double secondsOfDay(std::chrono::system_clock::time_point t) {
  const std::time_t whole = std::chrono::system_clock::to_time_t(t);
  std::tm local{};
  ::localtime_r(&whole, &local);
  const double fraction =
      std::chrono::duration<double>(t - std::chrono::system_clock::from_time_t(whole)).count();
  return local.tm_hour * 3600.0 + local.tm_min * 60.0 + local.tm_sec + fraction;
}

/// The pushes `device` logged as not stored, in order: sequence and the
/// moment (seconds of the day) it had sent it, from "[HH:MM:SS.mmm] ...
/// checkpoint N not stored (...; sent S s before)".
std::vector<std::pair<std::uint64_t, double>> failedPushes(const std::string& log, const std::string& device) {
  const std::regex line(R"(\[(\d\d):(\d\d):(\d\d\.\d+)\] \w+ )" + device +
                        R"(: checkpoint (\d+) not stored \(.*; sent ([0-9.]+) s before\))");
  std::vector<std::pair<std::uint64_t, double>> out;
  for (std::sregex_iterator it(log.begin(), log.end(), line), end; it != end; ++it) {
    const double at = std::stoi((*it)[1]) * 3600.0 + std::stoi((*it)[2]) * 60.0 + std::stod((*it)[3]);
    out.emplace_back(std::stoull((*it)[4]), at - std::stod((*it)[5]));
  }
  return out;
}

/// The most bytes any TCP socket in namespace `ns` has sent and not yet had
/// acknowledged (ss's Send-Q of an established connection).
std::uint64_t largestUnacknowledged(const std::string& ns) {
  std::uint64_t largest = 0;
  std::istringstream lines(runCommand(NetworkLab::inNamespace(ns, {"ss", "-tnH"})));
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string state;
    std::uint64_t recvQ = 0, sendQ = 0;
    if (fields >> state >> recvQ >> sendQ && state == "ESTAB") largest = std::max(largest, sendQ);
  }
  return largest;
}

/// Every checkpoint a device logged as acknowledged is in the server's store.
void expectNothingAcknowledgedLost(const std::string& dir) {
  const ChaosResult stored = checkAcknowledged(dir);
  for (const auto& f : stored.failures) ADD_FAILURE() << f;
  EXPECT_EQ(stored.lost, 0u);
  EXPECT_GT(stored.checkedByDigest + stored.folded, 0u) << "no acknowledgement found in the logs";
}

class LinkOutage : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (missing.empty()) missing = missingForNetworkLab();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }

  /// Starts the server, A active and B standby, each in its own namespace,
  /// waits for the full sync, two checkpoints after it and the guest counting
  /// on A, then puts A on `linkA` and B on `linkB`. With `deadLinkSeconds`, the server and the
  /// devices give a silent connection up after that long instead of 20 s:
  /// the tests that wait for a cut to be noticed wait less.
  void startCounting(Cluster& cluster, const char* linkA, const char* linkB, int deadLinkSeconds = 0) {
    cluster.useNetworkLab();
    // The full sync travels on lan, then the links take their profiles:
    // these tests are about what follows it, and the full checkpoint takes
    // tens of seconds on lte's uplink.
    cluster.setLink("A", "lan");
    cluster.setLink("B", "lan");
    std::vector<std::string> deadLink;
    if (deadLinkSeconds > 0) deadLink = {"--dead-link-timeout", std::to_string(deadLinkSeconds)};
    std::vector<std::string> device{"--block-source", "scan"};
    device.insert(device.end(), deadLink.begin(), deadLink.end());
    cluster.startServer(deadLink);
    cluster.startActive("A", device);
    cluster.startStandby("B", device);
    ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
    ASSERT_TRUE(
        waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 5; }, kBootAndSync))
        << "the guest on A is not counting" << cluster.logOf("A");
    cluster.setProfile("A", linkA);
    cluster.setProfile("B", linkB);
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

// A standby cut off for three times the dead-link timeout: its connections
// are found dead, it misses checkpoints, and once back it catches up with
// them merged into one, then takes the VM over.
TEST_F(LinkOutage, StandbyCutOffPastTheDeadLinkTimeoutCatchesUpAndTakesOver) {
  TempDir dir;
  Cluster cluster(dir.path());
  ASSERT_NO_FATAL_FAILURE(startCounting(cluster, "wifi", "lte", kShortDeadLinkSeconds));
  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("B")["applied_sequence"] == cluster.head(); },
                      std::chrono::seconds(60)))
      << cluster.logOf("B");

  const std::uint64_t before = cluster.head();
  cluster.setLinkUp("B", false);
  std::this_thread::sleep_for(std::chrono::seconds(3 * kShortDeadLinkSeconds));
  // The checkpoints went on without B, which fell behind.
  const std::uint64_t during = cluster.head();
  EXPECT_GE(during, before + 8) << cluster.logOf("A");
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
  ASSERT_NO_FATAL_FAILURE(startCounting(cluster, "lte", "wifi", kShortDeadLinkSeconds));

  // Checkpoints go every second; on lte's uplink a push of one takes a
  // fifth of that. The link goes down while A's connection holds more
  // unacknowledged bytes than any heartbeat or answer: a push on its way.
  // The log then shows whether the push that failed was sent before the cut;
  // a cut that came between two pushes after all is tried again.
  constexpr std::uint64_t kPushOnItsWay = 16 * 1024;
  const std::string aNamespace = cluster.networkLab()->deviceNamespace("A");
  std::size_t logBefore = 0;
  std::uint64_t sequence = 0;
  bool midPush = false;
  for (int attempt = 0; attempt < 4 && !midPush; ++attempt) {
    ASSERT_TRUE(waitFor([&] { return largestUnacknowledged(aNamespace) >= kPushOnItsWay; },
                        std::chrono::seconds(60), std::chrono::milliseconds(5)))
        << "A never had a push on its way" << cluster.logOf("A");
    logBefore = readFile(dir / "A.log").size();
    const double cutAt = secondsOfDay(std::chrono::system_clock::now());
    cluster.setLinkUp("A", false);
    ASSERT_TRUE(waitFor([&] { return readFile(dir / "A.log").find("not stored", logBefore) != std::string::npos; },
                        std::chrono::seconds(60)))
        << "no push failed while A was cut off" << cluster.logOf("A");
    std::this_thread::sleep_for(std::chrono::seconds(5));
    cluster.setLinkUp("A", true);
    // The cut came mid push when the push that failed had been sent before it.
    const auto failed = failedPushes(readFile(dir / "A.log").substr(logBefore), "A");
    ASSERT_FALSE(failed.empty()) << "the failed push's line was not recognised" << cluster.logOf("A");
    sequence = failed.front().first;
    midPush = failed.front().second < cutAt;
    std::printf("cut %d: checkpoint %llu sent %.2f s %s the cut\n", attempt + 1,
                static_cast<unsigned long long>(sequence), std::abs(cutAt - failed.front().second),
                midPush ? "before" : "after");
    if (!midPush) {
      ASSERT_TRUE(waitFor([&] { return readFile(dir / "A.log").find("registered with", logBefore) != std::string::npos; },
                          std::chrono::seconds(60)))
          << cluster.logOf("A");
    }
  }
  ASSERT_TRUE(midPush) << "none of 4 cuts came while a push was on its way" << cluster.logOf("A");
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

  // Either branch may follow a cut mid push; the next test forces the other.
  std::printf("checkpoint %llu %s\n", static_cast<unsigned long long>(sequence),
              aLog.find("checkpoint " + std::to_string(sequence) + " had reached the server") == std::string::npos
                  ? "never reached the server: its changes went with the next one"
                  : "reached the server whole; only its answer was lost");
  expectNothingAcknowledgedLost(dir.path());

  // What the failed push carried reached B through later checkpoints: the
  // digest of the final checkpoint, computed by A, is verified on B.
  switchAndCheck(cluster, dir.path(), "A", "B");
}

// A phone that moves to another network: the standby's address on its link
// changes while checkpoints go on. Its connection dies with the old address
// (nothing answers there any more); it notices within the dead-link timeout,
// registers again from the new address through the same server address,
// catches up, and takes the VM over with the image digest verified. The links
// are lan, for a short set-up: the dead-link timeout is most of the test.
TEST_F(LinkOutage, RenumberedStandbyComesBackFromItsNewAddressAndTakesOver) {
  TempDir dir;
  Cluster cluster(dir.path());
  ASSERT_NO_FATAL_FAILURE(startCounting(cluster, "lan", "lan"));
  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("B")["applied_sequence"] == cluster.head(); },
                      std::chrono::seconds(60)))
      << cluster.logOf("B");

  const std::size_t logBefore = readFile(dir / "B.log").size();
  const std::string before = cluster.networkLab()->deviceHost("B");
  const std::string after = cluster.renumber("B");
  ASSERT_NE(after, before);
  const std::uint64_t renumberedAt = cluster.head();
  const auto t0 = std::chrono::steady_clock::now();
  auto since = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "B.log").find("registered with", logBefore) != std::string::npos; },
                      std::chrono::seconds(60)))
      << "B did not register again after its address changed" << cluster.logOf("B") << cluster.logOf("server");
  std::printf("B registered again %.1f s after its address changed to %s\n", since(), after.c_str());
  // B noticed its address go (not the dead-link timeout, which takes 20 s).
  EXPECT_NE(readFile(dir / "B.log").find("this device's address " + before + " went away", logBefore),
            std::string::npos)
      << cluster.logOf("B");
  ASSERT_TRUE(cluster.waitForDevice("B", renumberedAt + 2, std::chrono::seconds(60)))
      << cluster.logOf("B") << cluster.logOf("server");
  std::printf("B applied checkpoint %llu, two past the head at the change, %.1f s after it\n",
              static_cast<unsigned long long>(renumberedAt + 2), since());
  switchAndCheck(cluster, dir.path(), "A", "B");
  std::printf("switch to B checked %.1f s after the change\n", since());
}

// The other side of a cut: the server stored the checkpoint, and the link
// went down while its answer was on the way. A test hook holds each push's
// answer for 3 s after the checkpoint is stored, and the link is cut then.
TEST_F(LinkOutage, ActiveCutOffWhileTheAnswerIsOnItsWayLosesNothing) {
  TempDir dir;
  Cluster cluster(dir.path());
  ::setenv("VMSYNC_TEST_HOLD_PUSH_ANSWER_MS", "3000", 1);
  ASSERT_NO_FATAL_FAILURE(startCounting(cluster, "wifi", "wifi", kShortDeadLinkSeconds));
  ::unsetenv("VMSYNC_TEST_HOLD_PUSH_ANSWER_MS");

  const std::size_t serverLogBefore = readFile(dir / "server.log").size();
  const std::size_t logBefore = readFile(dir / "A.log").size();
  static const std::regex held(R"(test hook: checkpoint (\d+) is stored; its answer waits)");
  std::smatch m;
  std::string serverLog;
  ASSERT_TRUE(waitFor(
      [&] {
        serverLog = readFile(dir / "server.log").substr(serverLogBefore);
        return std::regex_search(serverLog, m, held);
      },
      std::chrono::seconds(60)))
      << cluster.logOf("server");
  cluster.setLinkUp("A", false);
  const std::string sequence = m[1];
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "A.log").find("not stored", logBefore) != std::string::npos; },
                      std::chrono::seconds(60)))
      << "A's push did not fail while A was cut off" << cluster.logOf("A");
  cluster.setLinkUp("A", true);

  // A finds its push on the server as it reconnects, and goes on from it.
  ASSERT_TRUE(waitFor(
      [&] {
        return readFile(dir / "A.log").find("checkpoint " + sequence + " had reached the server", logBefore) !=
               std::string::npos;
      },
      std::chrono::seconds(90)))
      << "A did not take checkpoint " << sequence << " as stored" << cluster.logOf("A") << cluster.logOf("server");
  EXPECT_EQ(readFile(dir / "A.log").find("checkpoint " + sequence + " (", logBefore), std::string::npos)
      << "the answer to checkpoint " << sequence << " was not lost";
  const std::uint64_t afterCut = cluster.head();
  ASSERT_TRUE(cluster.waitForHead(afterCut + 2, std::chrono::seconds(120)))
      << cluster.logOf("A") << cluster.logOf("server");
  expectNothingAcknowledgedLost(dir.path());
  switchAndCheck(cluster, dir.path(), "A", "B");
}

}  // namespace
}  // namespace vmsync::testing
