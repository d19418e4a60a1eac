// The VM's life beyond one daemon: a stopped active device parks the VM, and
// it resumes where it stopped, on the same device or another; one daemon per
// device; errors that name what failed and leave no lease behind.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>

#include "cluster.h"

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

}  // namespace
}  // namespace vmsync::testing
