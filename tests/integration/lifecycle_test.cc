// The VM's life beyond one daemon: a stopped active device parks the VM, and
// it resumes where it stopped, on the same device or another; one daemon per
// device; errors that name what failed and leave no lease behind.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <filesystem>

#include "cluster.h"
#include "base/error.h"
#include "vmm/qmp_client.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

constexpr auto kBootAndSync = std::chrono::seconds(180);

class Lifecycle : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

/// Counter values `device`'s guest printed after byte `offset` of its serial log.
std::vector<long> countedSince(Cluster& cluster, const std::string& device, std::size_t offset) {
  const std::string log = readFile(cluster.serialLog(device));
  return counterValues(offset < log.size() ? log.substr(offset) : std::string());
}

/// The exit code of a process stopped with Process::stop(), or -1 when it did not exit by itself.
int exitCode(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : -1; }

/// Runs `vmsync ARGS`, bounded in time; returns its exit code and fills
/// `output` with what it printed (log lines and errors).
int vmsync(std::vector<std::string> args, std::string* output) {
  std::vector<std::string> argv{"timeout", "60", vmsyncBinary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv, output);
}

/// The error lines in `output`: the daemons' "] error " log lines and the
/// command's "vmsync: " lines.
std::vector<std::string> errorLines(const std::string& output) {
  std::vector<std::string> result;
  std::size_t start = 0;
  while (start < output.size()) {
    std::size_t end = output.find('\n', start);
    if (end == std::string::npos) end = output.size();
    const std::string line = output.substr(start, end - start);
    if (line.find("] error ") != std::string::npos || line.starts_with("vmsync: ")) result.push_back(line);
    start = end + 1;
  }
  return result;
}

TEST_F(Lifecycle, StoppedActiveParksTheVmWhichResumesWhereItStoppedOnAnyDevice) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A");
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 3; }, kBootAndSync))
      << cluster.logOf("A");

  // SIGTERM: A pauses its VM, ships a final checkpoint, gives the lease back, exits 0.
  ASSERT_EQ(exitCode(cluster.device("A").stop()), 0) << cluster.logOf("A");
  const long lastBeforeStop = counterValues(readFile(cluster.serialLog("A"))).back();
  auto status = cluster.status();
  ASSERT_TRUE(status) << cluster.logOf("server");
  EXPECT_EQ((*status)["active_device"], "") << status->dump(2);
  EXPECT_EQ((*status)["parked"], true) << status->dump(2);
  EXPECT_EQ((*status)["parked_by"], "A") << status->dump(2);
  EXPECT_NE(readFile(dir / "A.log").find("parked at checkpoint"), std::string::npos) << cluster.logOf("A");

  // `vmsync active` again on A resumes it there, with the next counter value.
  std::size_t offset = readFile(cluster.serialLog("A")).size();
  cluster.startActive("A");
  ASSERT_TRUE(waitFor([&] { return countedSince(cluster, "A", offset).size() >= 3; }, std::chrono::seconds(90)))
      << cluster.logOf("A");
  EXPECT_EQ(countedSince(cluster, "A", offset).front(), lastBeforeStop + 1) << cluster.logOf("A");
  EXPECT_EQ(readFile(cluster.serialLog("A")).substr(offset).find("vmsync-guest:"), std::string::npos)
      << "A booted the guest again instead of resuming it";
  status = cluster.status();
  ASSERT_TRUE(status);
  EXPECT_EQ((*status)["active_device"], "A") << status->dump(2);
  EXPECT_EQ((*status)["parked"], false) << status->dump(2);

  // `vmsync stop` parks it again and A's daemon exits by itself.
  ASSERT_TRUE(cluster.waitForHead(cluster.head() + 2, std::chrono::seconds(60))) << cluster.logOf("A");
  std::string errors;
  ASSERT_EQ(vmsync({"stop", "--server", cluster.address(), "--credential", cluster.credential("cli")}, &errors), 0)
      << errors << cluster.logOf("A") << cluster.logOf("server");
  ASSERT_TRUE(waitFor([&] { return !cluster.device("A").running(); }, std::chrono::seconds(30)))
      << "A's daemon did not exit after `vmsync stop`" << cluster.logOf("A");
  EXPECT_EQ(exitCode(cluster.device("A").stop()), 0) << cluster.logOf("A");
  const long lastOnA = counterValues(readFile(cluster.serialLog("A"))).back();

  // `switch --to B` resumes the parked VM on B with the next value.
  nlohmann::json report;
  std::string output;
  const std::size_t offsetB = readFile(cluster.serialLog("B")).size();
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0) << output << cluster.logOf("B") << cluster.logOf("server");
  EXPECT_EQ(report["from_parked"], true) << report.dump(2);
  EXPECT_EQ(report["from"], "A") << report.dump(2);
  ASSERT_TRUE(waitFor([&] { return countedSince(cluster, "B", offsetB).size() >= 3; }, std::chrono::seconds(60)))
      << cluster.logOf("B");
  EXPECT_EQ(countedSince(cluster, "B", offsetB).front(), lastOnA + 1) << cluster.logOf("B");
  EXPECT_EQ(readFile(cluster.serialLog("B")).find("vmsync-guest:"), std::string::npos)
      << "B booted the guest instead of resuming it";
}

TEST_F(Lifecycle, ASecondDaemonForADeviceIsRefusedAndTheFirstKeepsWorking) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A");
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");

  // The same device from another state directory: the server refuses it.
  std::string errors;
  EXPECT_EQ(vmsync({"standby", "--device", "B", "--state", dir / "B-again", "--server", cluster.address(),
                    "--credential", cluster.credential("B")},
                   &errors),
            1);
  EXPECT_NE(errors.find("device B is already connected"), std::string::npos) << errors;
  // Another daemon on B's state directory: the lock refuses it, naming the holder.
  EXPECT_EQ(vmsync({"standby", "--device", "B", "--state", cluster.stateDir("B"), "--server", cluster.address(),
                    "--credential", cluster.credential("B")},
                   &errors),
            1);
  EXPECT_NE(errors.find("is in use by another vmsync daemon (pid " + std::to_string(cluster.device("B").pid())),
            std::string::npos)
      << errors;
  // The same for the active device.
  EXPECT_EQ(vmsync({"active", "--device", "A", "--state", dir / "A-again", "--server", cluster.address(),
                    "--credential", cluster.credential("A"), "--image", guestImage(), "--accel", "tcg"},
                   &errors),
            1);
  EXPECT_NE(errors.find("device A is already connected"), std::string::npos) << errors;

  // The first daemons go on: A pushes and B applies, and B still takes over.
  auto status = cluster.status();
  ASSERT_TRUE(status);
  EXPECT_EQ((*status)["active_device"], "A") << status->dump(2);
  const std::uint64_t head = cluster.head();
  ASSERT_TRUE(cluster.waitForDevice("B", head + 3, std::chrono::seconds(60))) << cluster.logOf("B");
  std::string fromSerial;
  ASSERT_NO_FATAL_FAILURE(cluster.switchAndWatchTheCounter("A", "B", &fromSerial));
}

// A device daemon started before its server (or behind a link that is down)
// waits for the server instead of exiting; stopped while it waits, it exits 0.
// (A refusal still ends it at once: see ASecondDaemonForADeviceIsRefused...)
TEST(DeviceStart, ADaemonStartedBeforeItsServerWaitsForIt) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startStandby("B");
  cluster.startStandby("C");
  const std::string waiting = "cannot reach the sync server at " + cluster.address();
  for (const char* device : {"B", "C"})
    ASSERT_TRUE(waitFor([&] { return readFile(dir / (std::string(device) + ".log")).find(waiting) != std::string::npos; },
                        std::chrono::seconds(10)))
        << cluster.logOf(device);
  EXPECT_NE(readFile(dir / "B.log").find("trying again until it answers"), std::string::npos) << cluster.logOf("B");
  // C is stopped while it waits: a stop, not a failure.
  ASSERT_TRUE(cluster.device("C").running()) << cluster.logOf("C");
  EXPECT_EQ(exitCode(cluster.device("C").stop()), 0) << cluster.logOf("C");
  EXPECT_NE(readFile(dir / "C.log").find("stopped before the device was up"), std::string::npos) << cluster.logOf("C");

  std::this_thread::sleep_for(std::chrono::seconds(2));
  ASSERT_TRUE(cluster.device("B").running()) << "B gave up waiting for the server" << cluster.logOf("B");
  cluster.startServer();
  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("B").is_object(); }, std::chrono::seconds(15)))
      << cluster.logOf("B") << cluster.logOf("server");
  EXPECT_EQ(cluster.deviceStatus("B")["state"], "online") << cluster.deviceStatus("B").dump(2);
  EXPECT_NE(readFile(dir / "B.log").find("registered with " + cluster.address()), std::string::npos)
      << cluster.logOf("B");
}

TEST_F(Lifecycle, UnusableDirectoriesAndABusyPortAreOneLineErrorsAndNoLeaseIsLeftHeld) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  std::string errors;

  // A state directory that cannot be made.
  EXPECT_EQ(vmsync({"active", "--device", "A", "--state", "/proc/x", "--server", cluster.address(), "--credential",
                    cluster.credential("A"), "--image", guestImage(), "--accel", "tcg"},
                   &errors),
            1);
  EXPECT_EQ(errorLines(errors).size(), 1u) << errors;
  EXPECT_NE(errors.find("cannot use state directory /proc/x"), std::string::npos) << errors;

  // A guest image whose disk cannot be used: found only after the lease was
  // taken, which goes back.
  const fs::path badImage = dir / "bad-image";
  fs::create_directories(badImage);
  for (const char* name : {"vmlinuz", "initrd.img", "cmdline"})
    fs::copy_file(fs::path(guestImage()) / name, badImage / name);
  std::FILE* disk = std::fopen((badImage / "disk.img").c_str(), "w");  // one byte: not whole blocks
  ASSERT_NE(disk, nullptr);
  std::fputs("x", disk);
  std::fclose(disk);
  EXPECT_EQ(vmsync({"active", "--device", "A", "--state", dir / "A", "--server", cluster.address(), "--credential",
                    cluster.credential("A"), "--image", badImage.string(), "--accel", "tcg"},
                   &errors),
            1);
  EXPECT_EQ(errorLines(errors).size(), 1u) << errors;
  EXPECT_NE(errors.find("is not a multiple of 4096 bytes"), std::string::npos) << errors;
  EXPECT_NE(readFile(cluster.server().logPath()).find("lease epoch 1 granted to A"), std::string::npos)
      << "the failure did not come after the lease was taken" << cluster.logOf("server");
  auto status = cluster.status();
  ASSERT_TRUE(status);
  EXPECT_EQ((*status)["active_device"], "") << "the lease was left held: " << status->dump(2);

  // A server data directory that cannot be made, and a port in use.
  EXPECT_EQ(vmsync({"server", "--insecure", "--data", "/proc/x", "--listen", "127.0.0.1:" + std::to_string(freePort())},
                   &errors),
            1);
  EXPECT_EQ(errorLines(errors).size(), 1u) << errors;
  EXPECT_NE(errors.find("/proc/x"), std::string::npos) << errors;
  EXPECT_EQ(vmsync({"server", "--insecure", "--data", dir / "second-server", "--listen", cluster.address()}, &errors), 1);
  EXPECT_EQ(errorLines(errors).size(), 1u) << errors;
  EXPECT_NE(errors.find("cannot listen on " + cluster.address()), std::string::npos) << errors;
}

/// Whether `device`'s QEMU runs its guest now (query-status over its tools
/// QMP socket); false when no QEMU answers there.
bool vmRunning(Cluster& cluster, const std::string& device) {
  const std::string socket = cluster.stateDir(device) + "/run/tools-qmp.sock";
  if (!fs::exists(socket)) return false;
  try {
    QmpClient qmp(socket, std::chrono::milliseconds(200));
    return qmp.execute("query-status").value("running", false);
  } catch (const Error&) {
    return false;
  }
}

TEST_F(Lifecycle, ALostAnswerToActivateNeverLeavesTwoVmsRunning) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A");
  ::setenv("VMSYNC_TEST_LOSE_ACTIVATE_ANSWER", "1", 1);  // B's daemon drops its first activate answer
  cluster.startStandby("B");
  ::unsetenv("VMSYNC_TEST_LOSE_ACTIVATE_ANSWER");
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");

  // Every QEMU's status, polled through the whole switch and after.
  std::atomic<bool> done{false}, both{false};
  std::atomic<int> aRan{0}, bRan{0};
  std::thread poller([&] {
    while (!done) {
      const bool b = vmRunning(cluster, "B");  // B first: it does not stop once it runs
      const bool a = vmRunning(cluster, "A");
      aRan += a;
      bRan += b;
      if (a && b) both = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  nlohmann::json report;
  std::string output;
  const int rc = cluster.switchTo("B", &report, &output);
  // The server never heard B's answer: B keeps the lease, A is not resumed.
  const bool reconnected = waitFor(
      [&] {
        auto b = cluster.deviceStatus("B");
        return b["state"] == "online" && b["active"] == true;
      },
      std::chrono::seconds(60));
  const std::uint64_t head = cluster.head();
  const bool pushing = cluster.waitForHead(head + 3, std::chrono::seconds(60));
  done = true;
  poller.join();
  EXPECT_NE(rc, 0) << "the switch saw an answer it should have lost: " << report.dump(2);
  EXPECT_NE(output.find("answer was lost"), std::string::npos) << output;
  EXPECT_NE(readFile(dir / "B.log").find("test hook: the answer to activate is lost"), std::string::npos)
      << cluster.logOf("B");
  EXPECT_TRUE(reconnected) << cluster.logOf("B") << cluster.logOf("server");
  EXPECT_TRUE(pushing) << "B does not go on as the active device" << cluster.logOf("B");
  EXPECT_GT(aRan.load(), 0) << "the poll never saw A's VM run";
  EXPECT_GT(bRan.load(), 0) << "the poll never saw B's VM run";
  EXPECT_FALSE(both) << "both VMs ran at once" << cluster.logOf("A") << cluster.logOf("B") << cluster.logOf("server");
  auto status = cluster.status();
  ASSERT_TRUE(status);
  EXPECT_EQ((*status)["active_device"], "B") << status->dump(2);
  EXPECT_FALSE(vmRunning(cluster, "A"));
  EXPECT_TRUE(vmRunning(cluster, "B"));
}

}  // namespace
}  // namespace vmsync::testing
