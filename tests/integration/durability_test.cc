// The sync server loses nothing: it is killed for real at named points of a
// push and restarted, and a standby that was offline catches up in one merge.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <random>
#include <regex>
#include <thread>

#include <kj/async-io.h>

#include "chaos.h"
#include "cluster.h"
#include "power_cut_mount.h"
#include "transport/rpc_util.h"
#include "transport/secure_channel.h"
#include "vmsync.capnp.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

constexpr auto kBootAndSync = std::chrono::seconds(180);

/// Highest sequence device `device` logged as acknowledged ("checkpoint N (...) stored").
std::uint64_t lastAcknowledged(const std::string& log, const std::string& device) {
  static const std::regex stored(R"((\S+): checkpoint (\d+) \(\w+\) stored)");
  std::uint64_t last = 0;
  for (std::sregex_iterator it(log.begin(), log.end(), stored), end; it != end; ++it)
    if ((*it)[1] == device) last = std::max<std::uint64_t>(last, std::stoull((*it)[2]));
  return last;
}

/// A device peer that refuses every call: the test's stand-in for the old
/// active device's daemon coming back from a network cut.
class RefusingPeer final : public wire::DevicePeer::Server {
  kj::Promise<void> apply(ApplyContext) override { KJ_FAIL_REQUIRE("test peer applies nothing"); }
  kj::Promise<void> handOff(HandOffContext) override { KJ_FAIL_REQUIRE("test peer does not hand off"); }
  kj::Promise<void> activate(ActivateContext) override { KJ_FAIL_REQUIRE("test peer does not activate"); }
};

/// Names of the files in `dir`, sorted.
std::vector<std::string> listing(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

class Durability : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

/// After the server died (and the power with it): the server comes back on
/// what its disk kept, and everything A was told is stored is there.
void checkRestartLosesNothing(Cluster& cluster, const std::string& dir) {
  const std::uint64_t acknowledged = lastAcknowledged(readFile(dir + "/A.log"), "A");
  // The chain was at 3 before the first cut: fewer means the log line was not
  // read, and the checks below would prove nothing.
  ASSERT_GE(acknowledged, 3u) << "no acknowledged checkpoint found in A's log" << cluster.logOf("A");
  // What the cut left half written: the restarted server must discard it (a
  // listing after the restart would race with the device's next push).
  std::vector<std::string> leftovers;
  for (const auto& entry : fs::directory_iterator(dir + "/server/vms/owner/vm/checkpoints"))
    if (entry.path().string().ends_with(".tmp")) leftovers.push_back(entry.path().filename().string());
  const std::size_t logAt = readFile(dir + "/server.log").size();
  cluster.startServer();
  // The server verifies every record as it starts and puts a VM with damage
  // out of service: that it answers for the VM is the check that every
  // record passed.
  ASSERT_TRUE(cluster.status()) << "the server did not come back" << cluster.logOf("server");
  const std::uint64_t head = cluster.head();
  EXPECT_GE(head, acknowledged) << "an acknowledged checkpoint is missing after the restart";
  // Each acknowledged checkpoint is in the store with the digest A logged for
  // it (or folded into the base).
  const ChaosResult stored = checkAcknowledged(dir);
  for (const auto& f : stored.failures) ADD_FAILURE() << f;
  EXPECT_EQ(stored.lost, 0u);
  EXPECT_GE(stored.checkedByDigest + stored.folded, 3u) << "fewer acknowledgements found than the chain had";
  // No partial checkpoint is ever read: each temporary was discarded at start.
  const std::string restartLog = readFile(dir + "/server.log").substr(logAt);
  for (const auto& name : leftovers)
    EXPECT_NE(restartLog.find("discarding " + name + " left by an interrupted write"), std::string::npos)
        << name << " was not discarded at the restart" << cluster.logOf("server");
}

/// How many random cuts of each: VMSYNC_POWER_CUTS (make powercut sets 20), else 3.
int randomCuts() {
  const char* v = std::getenv("VMSYNC_POWER_CUTS");
  return v ? std::atoi(v) : 3;
}

/// B's power is cut after it wrote its image and before it recorded the
/// sequence reached, then at random moments: each time it starts from what
/// its disk kept and catches up.
void cutTheStandbysPower(Cluster& cluster, PowerCutMount& disk, const std::string& dir) {
  // B restarts with the test hook: it is SIGKILLed on its next apply, after
  // writing the image and before recording the sequence it reached; then the
  // power goes.
  cluster.stopDevice("B");
  ::setenv("VMSYNC_CRASH_AT", "standby-after-write", 1);
  cluster.startStandby("B");
  ::unsetenv("VMSYNC_CRASH_AT");
  ASSERT_TRUE(waitFor([&] { return !cluster.device("B").running(); }, std::chrono::seconds(60)))
      << "B was not killed mid-apply" << cluster.logOf("B");
  ASSERT_NE(readFile(dir + "/B.log").find("VMSYNC_CRASH_AT=standby-after-write"), std::string::npos);
  const PowerCutReport cut = disk.cut();
  disk.restore();
  std::printf("power cut of B mid-apply: %s\n", describe(cut).c_str());
  cluster.startStandby("B");
  // Before it registers again, B finishes the interrupted checkpoint from its
  // journal: its image is at a whole checkpoint, not between two.
  ASSERT_TRUE(waitFor([&] { return readFile(dir + "/B.log").find("from the journal") != std::string::npos; },
                      std::chrono::seconds(30)))
      << "B did not finish the interrupted apply from its journal" << cluster.logOf("B");
  ASSERT_TRUE(cluster.waitForDevice("B", cluster.head() + 1, std::chrono::seconds(60))) << cluster.logOf("B");

  // Cuts at moments no hook chooses, while B applies a checkpoint a second.
  std::mt19937 random(2);
  for (int i = 0, n = randomCuts(); i < n; ++i) {
    SCOPED_TRACE("random cut of B " + std::to_string(i + 1));
    const auto after = std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 1500)(random));
    std::this_thread::sleep_for(after);
    const PowerCutReport randomCut = disk.cut();  // the power goes, and B with it
    cluster.device("B").kill();
    disk.restore();
    cluster.startStandby("B");
    // B starts from what its disk kept (images and applied sequence as of
    // their last sync, the journal finishing an apply the cut interrupted).
    ASSERT_TRUE(cluster.waitForDevice("B", cluster.head() + 1, std::chrono::seconds(90)))
        << cluster.logOf("B") << cluster.logOf("server");
    std::printf("power cut %d of %d of B (%s): B caught up\n", i + 1, n, describe(randomCut).c_str());
  }
}

TEST_F(Durability, PowerCutsOfTheServerAndOfAStandbyLoseNothing) {
  TempDir dir;
  // The server's data directory on storage that keeps only what was made
  // durable: a cut also takes what a process kill would leave in the page
  // cache. Its fsyncs take 100 ms, so a random cut often comes mid-commit.
  PowerCutMount serverDisk(dir.path() + "/server", false, std::chrono::milliseconds(100));
  if (!serverDisk.missing().empty()) VMSYNC_SKIP_OR_FAIL(serverDisk.missing());
  // B's state directory (its images, journal and state) too. Both mounts go
  // after the cluster's processes.
  PowerCutMount standbyDisk(dir.path() + "/B", false, std::chrono::milliseconds(50));
  if (!standbyDisk.missing().empty()) VMSYNC_SKIP_OR_FAIL(standbyDisk.missing());
  Cluster cluster(dir.path());
  ASSERT_EQ(cluster.stateDir("B"), standbyDisk.path());
  cluster.startServer();
  cluster.startActive("A");  // the harness sets --interval 1
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");

  for (const char* point : {"before-data-write", "after-data-fsync", "after-rename", "after-commit", "before-ack"}) {
    SCOPED_TRACE(point);
    // The test hook: the server SIGKILLs itself at `point` of the next push.
    cluster.server().kill();  // kill -9 between pushes as well
    ::setenv("VMSYNC_CRASH_AT", point, 1);
    cluster.startServer();
    ::unsetenv("VMSYNC_CRASH_AT");
    ASSERT_TRUE(waitFor([&] { return !cluster.server().running(); }, std::chrono::seconds(60)))
        << "the server did not reach " << point << cluster.logOf("server");
    ASSERT_NE(readFile(dir.path() + "/server.log").find(std::string("VMSYNC_CRASH_AT=") + point), std::string::npos);
    const PowerCutReport cut = serverDisk.cut();
    serverDisk.restore();
    // Between the data's fsync and the directory's, the record's name is not
    // durable yet: the cut must have undone it, or it did not cut mid-commit.
    if (std::string(point) == "after-data-fsync" || std::string(point) == "after-rename") {
      EXPECT_GE(cut.namesUndone, 1u) << "the cut at " << point << " found every name durable";
    }
    ASSERT_NO_FATAL_FAILURE(checkRestartLosesNothing(cluster, dir.path()));
    std::printf("power cut at %-18s (%s): server restarted at head %llu\n", point, describe(cut).c_str(),
                static_cast<unsigned long long>(cluster.head()));
    // The active device reconnects and goes on pushing; B keeps up.
    ASSERT_TRUE(cluster.waitForHead(cluster.head() + 2, std::chrono::seconds(90)))
        << cluster.logOf("server") << cluster.logOf("A") << cluster.logOf("B");
  }

  // Cuts at moments no hook chooses, while A pushes every second.
  std::mt19937 random(1);
  int midWrite = 0;
  for (int i = 0, n = randomCuts(); i < n; ++i) {
    SCOPED_TRACE("random cut " + std::to_string(i + 1));
    const std::uint64_t reached = cluster.head();
    const auto after = std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 1500)(random));
    std::this_thread::sleep_for(after);
    const PowerCutReport cut = serverDisk.cut();  // the power goes, and the server with it
    cluster.server().kill();
    serverDisk.restore();
    if (cut.namesUndone + cut.filesReverted > 0) ++midWrite;
    ASSERT_NO_FATAL_FAILURE(checkRestartLosesNothing(cluster, dir.path()));
    std::printf("power cut %d of %d, %lld ms after head %llu (%s): server restarted at head %llu\n", i + 1, n,
                static_cast<long long>(after.count()), static_cast<unsigned long long>(reached),
                describe(cut).c_str(), static_cast<unsigned long long>(cluster.head()));
    ASSERT_TRUE(cluster.waitForHead(cluster.head() + 1, std::chrono::seconds(90)))
        << cluster.logOf("server") << cluster.logOf("A") << cluster.logOf("B");
  }
  std::printf("%d of %d random cuts found a write not yet durable\n", midWrite, randomCuts());

  ASSERT_NO_FATAL_FAILURE(cutTheStandbysPower(cluster, standbyDisk, dir.path()));

  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0)
      << output << cluster.logOf("A") << cluster.logOf("B") << cluster.logOf("server");
  EXPECT_EQ(report["to"], "B");  // B's image matched A's digest before it resumed
}

TEST_F(Durability, StandbyOfflineForTenCheckpointsCatchesUpInOneMerge) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A");  // the harness sets --interval 1
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");

  cluster.stopDevice("B");
  const std::uint64_t left = cluster.head();
  ASSERT_TRUE(waitFor([&] { return cluster.head() >= left + 12; }, std::chrono::seconds(90))) << cluster.logOf("A");
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForDevice("B", left + 12, std::chrono::seconds(90)))
      << cluster.logOf("B") << cluster.logOf("server");

  static const std::regex merged(
      R"(catch-up for B: checkpoints (\d+)\.\.(\d+) \((\d+) checkpoints, (\d+) bytes\) merged into one of (\d+) bytes)");
  const std::string log = readFile(dir.path() + "/server.log");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(log, m, merged)) << cluster.logOf("server");
  const std::uint64_t count = std::stoull(m[3]), missedBytes = std::stoull(m[4]), mergedBytes = std::stoull(m[5]);
  std::printf("B missed %llu checkpoints (%llu bytes); its catch-up was one checkpoint of %llu bytes\n",
              static_cast<unsigned long long>(count), static_cast<unsigned long long>(missedBytes),
              static_cast<unsigned long long>(mergedBytes));
  EXPECT_GE(count, 10u);
  EXPECT_LE(mergedBytes, missedBytes);
  const std::string bLog = readFile(dir.path() + "/B.log");
  ASSERT_NE(bLog.find("B: applied checkpoint " + std::string(m[2]) + " "), std::string::npos)
      << "B did not log applying the merge" << cluster.logOf("B");
  EXPECT_EQ(bLog.find("B: applied checkpoint " + std::string(m[1]) + " "), std::string::npos)
      << "B received a missed checkpoint on its own instead of the merge";

  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0) << output << cluster.logOf("A") << cluster.logOf("B");
}

TEST_F(Durability, OldActiveWithOldEpochIsFencedAndChangesNothing) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A");
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0) << output << cluster.logOf("A") << cluster.logOf("B");
  const std::uint64_t oldEpoch = report["epoch"].get<std::uint64_t>() - 1;
  const std::uint64_t finalSequence = report["final_sequence"];
  // A is cut off: its daemon is gone, and what comes back speaks with A's
  // name and A's old lease epoch.
  cluster.stopDevice("A");
  ASSERT_TRUE(cluster.waitForHead(finalSequence + 2, std::chrono::seconds(60))) << cluster.logOf("B");
  // Freeze the chain so "nothing changes" can be compared; kill -9, since a
  // stopped active device would park the VM and give the lease back.
  cluster.device("B").kill();
  auto before = cluster.status();
  ASSERT_TRUE(before);
  const auto filesBefore = listing(dir.path() + "/server/vms/owner/vm/checkpoints");
  const std::uint64_t head = (*before)["head_sequence"];

  auto io = kj::setupAsyncIo();
  ClientTransport transport(loadCredential(cluster.credential("A")));
  auto connection = transport.connect(io, cluster.address()).wait(io.waitScope);
  auto server = connection->bootstrap().castAs<wire::SyncServer>();
  auto registration = server.registerRequest();
  registration.setDeviceId("A");
  registration.setPeer(kj::heap<RefusingPeer>());
  registration.setAppliedSequence(finalSequence);
  auto registered = registration.send().wait(io.waitScope);
  auto push = registered.getSession().pushRequest();
  auto checkpoint = push.initCheckpoint();
  checkpoint.setVmId(registered.getVmId());
  checkpoint.setEpoch(oldEpoch);
  checkpoint.setSequence(head + 1);
  checkpoint.setBaseSequence(head);
  checkpoint.setKind(wire::CheckpointKind::INCREMENTAL);
  checkpoint.setOrigin("A");
  checkpoint.initMemory(1)[0].setEncoding(wire::ChunkEncoding::ZERO);
  std::string error;
  push.send().then([](auto&&) {}, [&](kj::Exception&& e) { error = e.getDescription().cStr(); }).wait(io.waitScope);
  std::printf("old active's push with epoch %llu: %s\n", static_cast<unsigned long long>(oldEpoch), error.c_str());
  EXPECT_NE(error.find("fenced"), std::string::npos) << "the stale push was not refused as fenced: " << error;

  auto after = cluster.status();
  ASSERT_TRUE(after);
  EXPECT_EQ((*after)["head_sequence"], (*before)["head_sequence"]);
  EXPECT_EQ((*after)["epoch"], (*before)["epoch"]);
  EXPECT_EQ((*after)["active_device"], "B");
  EXPECT_EQ(listing(dir.path() + "/server/vms/owner/vm/checkpoints"), filesBefore);
}

}  // namespace
}  // namespace vmsync::testing
