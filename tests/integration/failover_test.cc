// Losing the active device: kill -9 of its daemon and its QEMU at a seeded
// moment, `switch --force` after the lease timeout resumes the VM on another
// device from the newest resumable point, and the lost device comes back as a
// standby that never runs its stale VM and takes the VM over again later.
//
// VMSYNC_FAILOVER_SEEDS sets how many seeds run (3 in `make test`, 20 in `make soak`).
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <thread>

#include "cluster.h"

namespace vmsync::testing {
namespace {

constexpr auto kBootAndSync = std::chrono::seconds(180);
constexpr int kLeaseTimeoutSeconds = 3;

int seedCount() {
  const char* v = std::getenv("VMSYNC_FAILOVER_SEEDS");
  return v && std::atoi(v) > 0 ? std::atoi(v) : 3;
}

/// Pids of the processes whose command line mentions `text`.
std::vector<pid_t> processesMentioning(const std::string& text) {
  std::vector<pid_t> pids;
  DIR* proc = ::opendir("/proc");
  if (!proc) return pids;
  while (dirent* entry = ::readdir(proc)) {
    const pid_t pid = std::atoi(entry->d_name);
    if (pid <= 0 || pid == ::getpid()) continue;
    std::string cmdline = readFile("/proc/" + std::string(entry->d_name) + "/cmdline");
    std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
    if (cmdline.find(text) != std::string::npos) pids.push_back(pid);
  }
  ::closedir(proc);
  return pids;
}

/// kill -9 of `device`'s daemon and its QEMU, as when the device is lost;
/// returns once the QEMU is gone. False when its QEMU was not found.
bool killDeviceAndItsVm(Cluster& cluster, const std::string& device) {
  const std::string mentions = "mem-path=" + cluster.stateDir(device) + "/ram.img";
  std::vector<pid_t> qemu = processesMentioning(mentions);
  if (qemu.size() != 1) return false;
  ::kill(cluster.device(device).pid(), SIGKILL);
  ::kill(qemu.front(), SIGKILL);
  cluster.device(device).kill();
  return waitFor([&] { return processesMentioning(mentions).empty(); }, std::chrono::seconds(10));
}

/// The checkpoints at which the server saw `device` back on the chain after a
/// resync, in order. A resync that fails ends with the device starting over,
/// "back on the chain at checkpoint 0".
std::vector<std::uint64_t> backOnChain(const std::string& serverLog, const std::string& device) {
  std::vector<std::uint64_t> at;
  const std::regex line("device " + device + ": back on the chain at checkpoint ([0-9]+)");
  for (auto it = std::sregex_iterator(serverLog.begin(), serverLog.end(), line); it != std::sregex_iterator(); ++it)
    at.push_back(std::stoull((*it)[1]));
  return at;
}

class Failover : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

TEST_P(Failover, ActiveLostAtASeededMomentResumesOnBFromTheNewestResumablePoint) {
  std::mt19937 random(static_cast<unsigned>(GetParam()));
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer({"--lease-timeout", std::to_string(kLeaseTimeoutSeconds)});
  cluster.startActive("A", {"--resumable-every", "2"});
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 3; }, kBootAndSync))
      << cluster.logOf("A");
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "A.log").find("resumable point") != std::string::npos; },
                      std::chrono::seconds(60)))
      << "A made no resumable point" << cluster.logOf("A");

  // kill -9 of the daemon and its QEMU, at a moment the seed picks.
  std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 6000)(random)));
  ASSERT_TRUE(killDeviceAndItsVm(cluster, "A")) << "A's QEMU not found, or it did not die";
  const std::vector<long> onA = counterValues(readFile(cluster.serialLog("A")));
  const std::size_t aSerialAtDeath = readFile(cluster.serialLog("A")).size();
  ASSERT_FALSE(onA.empty());

  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("A")["state"] == "offline"; }, std::chrono::seconds(30)))
      << "the server still sees A online" << cluster.logOf("server");
  auto status = cluster.status();
  ASSERT_TRUE(status);
  const std::uint64_t point = (*status)["resumable_point"];
  ASSERT_GT(point, 0u) << status->dump(2);

  const std::uint64_t bApplied = cluster.deviceStatus("B")["applied_sequence"];
  // Before the lease timeout a forced switch is refused, saying how long is left.
  nlohmann::json report;
  std::string output;
  ASSERT_NE(cluster.switchTo("B", &report, &output), 0) << "forced too early? " << report.dump(2);
  ASSERT_NE(output.find("--force"), std::string::npos) << output;  // without --force: the hint
  std::string forced;
  std::vector<std::string> argv{vmsyncBinary(), "switch",  "--to",   "B",      "--force", "--json",
                                "--server",     cluster.address(), "--credential", cluster.credential("cli")};
  const bool early = run(argv, &forced) != 0;
  if (early) {
    EXPECT_NE(forced.find("s more"), std::string::npos) << forced;
    std::this_thread::sleep_for(std::chrono::seconds(kLeaseTimeoutSeconds + 1));
    ASSERT_EQ(run(argv, &forced), 0) << forced << cluster.logOf("B") << cluster.logOf("server");
  }
  report = nlohmann::json::parse(forced.substr(forced.find('{')));
  EXPECT_EQ(report["forced"], true) << forced;
  EXPECT_EQ(report["final_sequence"], point) << forced;
  EXPECT_GT(report["lost_ms"].get<double>(), 0.0) << forced;

  // B resumed from the resumable point: it checked the image digest of that
  // checkpoint, and its counter goes on from a value A printed.
  const std::string bLog = readFile(dir / "B.log");
  EXPECT_TRUE(std::regex_search(bLog, std::regex("final checkpoint " + std::to_string(point) +
                                                 ": image digest [0-9a-f]+ verified")))
      << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("B"))).size() >= 3; },
                      std::chrono::seconds(60)))
      << cluster.logOf("B");
  // B, if it had applied checkpoints past the point, came back to it by a
  // resync of the units that differ, not by starting over.
  if (bApplied > point) {
    EXPECT_TRUE(std::regex_search(readFile(dir / "B.log"),
                                  std::regex("resynced from checkpoint " + std::to_string(bApplied) +
                                             " to the chain's checkpoint " + std::to_string(point) +
                                             ": [0-9]+ pages and [0-9]+ blocks replaced")))
        << cluster.logOf("B");
    EXPECT_EQ(backOnChain(readFile(dir / "server.log"), "B"), std::vector<std::uint64_t>{point})
        << cluster.logOf("server");
  } else {
    EXPECT_TRUE(backOnChain(readFile(dir / "server.log"), "B").empty()) << cluster.logOf("server");
  }
  const std::vector<long> onB = counterValues(readFile(cluster.serialLog("B")));
  std::string why;
  EXPECT_TRUE(consecutive(onB, &why)) << why;
  EXPECT_GE(onB.front() - 1, onA.front()) << "B went back before what A printed";
  EXPECT_LE(onB.front() - 1, onA.back()) << "B continued from a value A never reached";

  // A comes back: its image went on past the chain, so it starts over as a
  // standby, never running its VM, and a later switch to it continues B's count.
  cluster.startStandby("A");
  ASSERT_TRUE(cluster.waitForDevice("A", cluster.head(), std::chrono::seconds(120)))
      << cluster.logOf("A") << cluster.logOf("server");
  EXPECT_NE(readFile(dir / "A.log").find("stopped without a final checkpoint"), std::string::npos)
      << cluster.logOf("A");
  // Its image, past the chain, came back by a resync, not by starting over.
  EXPECT_TRUE(std::regex_search(readFile(dir / "A.log"),
                                std::regex("resynced from checkpoint [0-9]+ to the chain's checkpoint [0-9]+: "
                                           "[0-9]+ pages and [0-9]+ blocks replaced")))
      << cluster.logOf("A");
  const std::vector<std::uint64_t> aBack = backOnChain(readFile(dir / "server.log"), "A");
  ASSERT_FALSE(aBack.empty()) << cluster.logOf("server");
  for (std::uint64_t at : aBack) EXPECT_GT(at, 0u) << "A started over" << cluster.logOf("server");
  EXPECT_EQ(readFile(cluster.serialLog("A")).size(), aSerialAtDeath) << "A's VM ran after it was lost";
  ASSERT_TRUE(cluster.waitForHead(cluster.head() + 2, std::chrono::seconds(60))) << cluster.logOf("B");
  ASSERT_EQ(cluster.switchTo("A", &report, &output), 0) << output << cluster.logOf("A") << cluster.logOf("B");
  const long lastOnB = counterValues(readFile(cluster.serialLog("B"))).back();
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A")).substr(aSerialAtDeath)).size() >= 3; },
                      std::chrono::seconds(60)))
      << cluster.logOf("A");
  EXPECT_EQ(counterValues(readFile(cluster.serialLog("A")).substr(aSerialAtDeath)).front(), lastOnB + 1)
      << cluster.logOf("A");
}

INSTANTIATE_TEST_SUITE_P(Seeds, Failover, ::testing::Range(1, seedCount() + 1));

/// Checkpoint numbers after a failover's point are used again by the new
/// chain. A standby that applied an abandoned checkpoint N and was away
/// while the new chain passed N must not pass for one at the new N: the
/// server tells them apart by lease epoch and resyncs it.
TEST(FailoverAway, StandbyThatAppliedAbandonedCheckpointsComesBackByAResync) {
  std::string missing = missingForVm();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer({"--lease-timeout", std::to_string(kLeaseTimeoutSeconds)});
  cluster.startActive("A", {"--resumable-every", "5"});
  cluster.startStandby("B");
  cluster.startStandby("C");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
  // C holds checkpoints past the newest resumable point when it leaves, and
  // A is lost right after.
  std::uint64_t cAt = 0, point = 0;
  ASSERT_TRUE(waitFor(
      [&] {
        auto status = cluster.status();
        if (!status) return false;
        point = (*status)["resumable_point"];
        const std::uint64_t head = (*status)["head_sequence"];
        cAt = cluster.deviceStatus("C")["applied_sequence"];
        return point > 0 && head > point && cAt == head;
      },
      std::chrono::seconds(120)))
      << cluster.logOf("A") << cluster.logOf("C");
  cluster.stopDevice("C");
  ASSERT_TRUE(killDeviceAndItsVm(cluster, "A")) << "A's QEMU not found, or it did not die";
  cluster.stopDevice("A");

  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("A")["state"] == "offline"; }, std::chrono::seconds(30)));
  std::this_thread::sleep_for(std::chrono::seconds(kLeaseTimeoutSeconds + 1));
  std::string forced;
  ASSERT_EQ(run({vmsyncBinary(), "switch", "--to", "B", "--force", "--json", "--server", cluster.address(),
                 "--credential", cluster.credential("cli")},
                &forced),
            0)
      << forced << cluster.logOf("B") << cluster.logOf("server");
  const std::uint64_t resumedAt = nlohmann::json::parse(forced.substr(forced.find('{')))["final_sequence"];
  ASSERT_LT(resumedAt, cAt) << "C left at " << cAt << ", which the failover kept: nothing of C's was abandoned";

  // The new chain passes the number C is at, then C comes back.
  ASSERT_TRUE(cluster.waitForHead(cAt + 2, std::chrono::seconds(120))) << cluster.logOf("B");
  cluster.startStandby("C");
  ASSERT_TRUE(cluster.waitForDevice("C", cluster.head(), std::chrono::seconds(120)))
      << cluster.logOf("C") << cluster.logOf("server");
  const std::string serverLog = readFile(dir / "server.log");
  EXPECT_NE(serverLog.find("device C: its checkpoint " + std::to_string(cAt) + " (lease epoch 1) is one a failover "
                           "abandoned"),
            std::string::npos)
      << cluster.logOf("server");
  EXPECT_TRUE(std::regex_search(readFile(dir / "C.log"),
                                std::regex("resynced from checkpoint " + std::to_string(cAt) +
                                           " to the chain's checkpoint [0-9]+: [0-9]+ pages and [0-9]+ blocks "
                                           "replaced")))
      << cluster.logOf("C");
  const std::vector<std::uint64_t> cBack = backOnChain(serverLog, "C");
  ASSERT_EQ(cBack.size(), 1u) << cluster.logOf("server");
  EXPECT_GT(cBack.front(), 0u) << "C started over" << cluster.logOf("server");

  // Its image is the chain's: the VM resumes there and counts on from B.
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("B"))).size() >= 2; },
                      std::chrono::seconds(60)))
      << "B's guest printed nothing" << cluster.logOf("B");
  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("C", &report, &output), 0) << output << cluster.logOf("C") << cluster.logOf("B");
  const long lastOnB = counterValues(readFile(cluster.serialLog("B"))).back();
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("C"))).size() >= 2; },
                      std::chrono::seconds(60)))
      << cluster.logOf("C");
  EXPECT_EQ(counterValues(readFile(cluster.serialLog("C"))).front(), lastOnB + 1) << cluster.logOf("C");
}

}  // namespace
}  // namespace vmsync::testing
