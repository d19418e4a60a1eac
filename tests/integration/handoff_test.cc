// End to end: a real Linux guest under QEMU moves between devices through the
// sync server and keeps counting where it stopped.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <thread>

#include "chaos.h"
#include "cluster.h"
#include "metrics_scrape.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

constexpr auto kBootAndSync = std::chrono::seconds(180);

/// Counter values on the guest's disk: a copy of the image, its journal
/// replayed by e2fsck, read with debugfs (no mount needed).
/// True when `device` logged at least `atLeast` final scans in which the
/// `source` block source had reported every changed unit, and none in which
/// it had missed one.
::testing::AssertionResult everyFinalScanMatched(const std::string& log, const std::string& device,
                                                 const std::string& source, int atLeast) {
  const std::string matched = device + ": the final scan found ";
  const std::string tail = " changed units, each reported by the " + source + " source";
  int count = 0;
  for (std::size_t at = log.find(matched); at != std::string::npos; at = log.find(matched, at + 1)) {
    const std::size_t end = log.find('\n', at);
    if (log.substr(at, end - at).find(tail) != std::string::npos) ++count;
  }
  if (log.find(device + ": the final scan found") != std::string::npos &&
      log.find("the " + source + " source did not report") != std::string::npos)
    return ::testing::AssertionFailure() << "a final scan found units the " << source << " source did not report";
  if (count < atLeast)
    return ::testing::AssertionFailure() << count << " final scans matched by the " << source << " source, expected "
                                         << atLeast << " or more";
  return ::testing::AssertionSuccess();
}

std::vector<long> counterFileValues(const std::string& diskImage, const std::string& scratch, std::string* error) {
  std::string copy = scratch + "/disk-copy.img";
  fs::copy_file(diskImage, copy, fs::copy_options::overwrite_existing);
  std::string out;
  int rc = run({"e2fsck", "-fy", copy}, &out);
  if (rc > 2) {  // 0: clean, 1/2: errors corrected
    *error = "e2fsck failed (" + std::to_string(rc) + "): " + out;
    return {};
  }
  if (run({"debugfs", "-R", "cat /var/lib/vmsync/counter.log", copy}, &out) != 0) {
    *error = "debugfs failed: " + out;
    return {};
  }
  std::vector<long> values;
  std::size_t start = 0;
  while (start < out.size()) {
    std::size_t end = out.find('\n', start);
    if (end == std::string::npos) end = out.size();
    std::string line = out.substr(start, end - start);
    if (!line.empty() && line.find_first_not_of("0123456789") == std::string::npos) values.push_back(std::stol(line));
    start = end + 1;
  }
  return values;
}

class LiveHandoff : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

TEST_F(LiveHandoff, CounterContinuesAcrossSwitchesBothWays) {
  // Disk writes harvested by eBPF (the scan source is covered below).
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A", {"--block-source", "bpf", "--metrics-listen", "127.0.0.1:0"});
  cluster.startStandby("B", {"--block-source", "bpf", "--metrics-listen", "127.0.0.1:0"});

  // The full sync plus at least three incremental checkpoints, applied by B.
  ASSERT_TRUE(cluster.waitForHead(4, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 10; }, kBootAndSync))
      << "the guest on A is not counting" << cluster.logOf("A");
  ASSERT_TRUE(cluster.waitForHead(cluster.head() + 1, std::chrono::seconds(60))) << cluster.logOf("B");

  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0) << output << cluster.logOf("A") << cluster.logOf("B");
  EXPECT_EQ(report["from"], "A");
  EXPECT_EQ(report["to"], "B");
  for (const char* phase : {"pause_ms", "final_harvest_ms", "device_state_save_ms", "transfer_ms", "apply_ms",
                            "device_state_load_ms", "resume_ms", "total_ms"})
    EXPECT_TRUE(report.contains(phase)) << phase;
  EXPECT_GT(report["total_ms"].get<double>(), 0.0);
  EXPECT_GT(report["device_state_save_ms"].get<double>(), 0.0);
  // QEMU's device state travels compressed: less than half its saved size.
  const auto stateBytes = report["device_state_bytes"].get<std::uint64_t>();
  const auto stateWireBytes = report["device_state_wire_bytes"].get<std::uint64_t>();
  EXPECT_GT(stateBytes, 100000u) << report.dump(2);
  EXPECT_GT(stateWireBytes, 0u) << report.dump(2);
  EXPECT_LT(stateWireBytes * 2, stateBytes) << report.dump(2);
  EXPECT_LT(stateWireBytes, report["final_bytes"].get<std::uint64_t>()) << report.dump(2);

  // The daemons' metrics, scraped as Prometheus would: A pushed the full
  // checkpoint, incremental ones and the final one (resumable points are
  // counted apart), and runs the VM no more; B holds the final checkpoint
  // and runs the VM under the new epoch.
  {
    const int portA = metricsPortInLog(readFile(dir / "A.log")), portB = metricsPortInLog(readFile(dir / "B.log"));
    ASSERT_GT(portA, 0) << cluster.logOf("A");
    ASSERT_GT(portB, 0) << cluster.logOf("B");
    const std::string a = scrapeMetrics(portA), b = scrapeMetrics(portB);
    const double final = report["final_sequence"].get<double>();
    EXPECT_EQ(metricSample(a, "vmsync_device_checkpoints_pushed_total", {R"(kind="full")"}), 1) << a;
    EXPECT_EQ(metricSample(a, "vmsync_device_checkpoints_pushed_total", {R"(kind="final")"}), 1) << a;
    EXPECT_GE(metricSample(a, "vmsync_device_checkpoints_pushed_total", {R"(kind="incremental")"}), 3) << a;
    EXPECT_EQ(metricSample(a, "vmsync_device_sequence", {R"(device="A")"}), final) << a;
    EXPECT_EQ(metricSample(a, "vmsync_device_active"), 0) << a;
    // B may have pushed a checkpoint of its own since.
    EXPECT_GE(metricSample(b, "vmsync_device_sequence", {R"(device="B")"}), final) << b;
    EXPECT_GT(metricSample(b, "vmsync_device_checkpoints_applied_total"), 0) << b;
    EXPECT_EQ(metricSample(b, "vmsync_device_active"), 1) << b;
    EXPECT_EQ(metricSample(b, "vmsync_device_lease_epoch"), report["epoch"].get<double>()) << b;
  }

  // A's VM is gone; B continues from A's memory, not from a fresh boot.
  const std::string aBefore = readFile(cluster.serialLog("A"));
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("B"))).size() >= 5; },
                      std::chrono::seconds(60)))
      << "B's guest does not count after the switch" << cluster.logOf("B");
  const std::vector<long> onA = counterValues(aBefore);
  const std::vector<long> afterFirst = counterValues(readFile(cluster.serialLog("B")));
  ASSERT_FALSE(onA.empty());
  // The guest's init prints "vmsync-guest:" lines as it boots: A has them, B must not.
  ASSERT_NE(aBefore.find("vmsync-guest:"), std::string::npos) << "the guest's boot lines are not recognised";
  EXPECT_EQ(readFile(cluster.serialLog("B")).find("vmsync-guest:"), std::string::npos)
      << "B booted the guest instead of resuming it";
  std::string why;
  EXPECT_TRUE(consecutive(counterValues(aBefore + readFile(cluster.serialLog("B"))), &why))
      << "counter not continuous across A -> B: " << why;
  EXPECT_GT(afterFirst.front(), onA.front());

  // Back to A, which stayed current as a standby.
  const std::uint64_t finalSequence = report["final_sequence"];
  ASSERT_TRUE(cluster.waitForHead(finalSequence + 3, std::chrono::seconds(60))) << cluster.logOf("B");
  ASSERT_EQ(cluster.switchTo("A", &report, &output), 0) << output << cluster.logOf("A") << cluster.logOf("B");
  EXPECT_EQ(report["to"], "A");
  const std::string bLog = readFile(cluster.serialLog("B"));
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A")).substr(aBefore.size())).size() >= 5; },
                      std::chrono::seconds(60)))
      << "A's guest does not count after switching back" << cluster.logOf("A");
  const std::string aAfter = readFile(cluster.serialLog("A")).substr(aBefore.size());
  EXPECT_TRUE(consecutive(counterValues(aBefore + bLog + aAfter), &why))
      << "counter not continuous across A -> B -> A: " << why;

  // The counter file on the disk holds A's values, then B's, then A's again.
  const long lastOnB = counterValues(bLog).back();
  cluster.stopDevice("A");  // quits QEMU; the disk image is now still
  std::string error;
  auto fileValues = counterFileValues(cluster.stateDir("A") + "/disk.img", dir.path(), &error);
  ASSERT_TRUE(error.empty()) << error;
  ASSERT_FALSE(fileValues.empty());
  EXPECT_TRUE(consecutive(fileValues, &why)) << "counter file: " << why;
  EXPECT_LE(fileValues.front(), onA.front());
  EXPECT_GT(fileValues.back(), lastOnB) << "the file lacks the values written after switching back to A";
  // At each final checkpoint the full comparison found nothing the bpf source had not reported.
  EXPECT_TRUE(everyFinalScanMatched(readFile(dir / "A.log"), "A", "bpf", 1)) << cluster.logOf("A");
  EXPECT_TRUE(everyFinalScanMatched(readFile(dir / "B.log"), "B", "bpf", 1)) << cluster.logOf("B");
}

/// Writes 4096 bytes of 0xEE over the last block of `device`'s disk image,
/// which the guest never writes: damage the checkpoints will not repair.
void damageLastDiskBlock(Cluster& cluster, const std::string& device) {
  const std::string disk = cluster.stateDir(device) + "/disk.img";
  int fd = ::open(disk.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0) << disk << ": " << std::strerror(errno);
  std::string garbage(4096, '\xEE');
  ASSERT_EQ(::pwrite(fd, garbage.data(), garbage.size(), static_cast<off_t>(fs::file_size(disk) - 4096)), 4096);
  ::close(fd);
}

// With --full-verify the target hashes its whole image at the switch: damage
// done behind the daemon's back is found there, and the VM stays on A.
TEST_F(LiveHandoff, CorruptedStandbyImageIsNotResumed) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A", {"--block-source", "scan"});
  cluster.startStandby("B", {"--block-source", "scan", "--full-verify", "--image-check-every", "0"});
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 5; }, kBootAndSync))
      << "the guest on A is not counting" << cluster.logOf("A");

  ASSERT_NO_FATAL_FAILURE(damageLastDiskBlock(cluster, "B"));

  nlohmann::json report;
  std::string output;
  EXPECT_NE(cluster.switchTo("B", &report, &output), 0) << output;
  EXPECT_NE(output.find("digest mismatch"), std::string::npos) << output;
  // The whole image was hashed, and it says the kept hashes missed a unit.
  EXPECT_NE(output.find(" (the whole image hashed): expected "), std::string::npos) << output;
  const std::string logB = readFile(dir / "B.log");
  EXPECT_NE(logB.find("hashing the whole image found 1 unit not as applied"), std::string::npos)
      << cluster.logOf("B");
  EXPECT_NE(output.find("resumed on A"), std::string::npos) << output;
  EXPECT_TRUE(counterValues(readFile(cluster.serialLog("B"))).empty()) << "B resumed a damaged image";

  // The VM goes on, on A, and A keeps the lease.
  const std::size_t before = counterValues(readFile(cluster.serialLog("A"))).size();
  EXPECT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= before + 5; },
                      std::chrono::seconds(60)))
      << cluster.logOf("A");
  auto status = cluster.status();
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ((*status)["active_device"], "A");
  std::string why;
  EXPECT_TRUE(consecutive(counterValues(readFile(cluster.serialLog("A"))), &why)) << why;
}

// By default a final checkpoint is checked from the unit hashes the standby
// keeps on every apply (its cost follows what the checkpoint wrote), and the
// standby re-reads its image in the background against them: damage done
// behind its back is found there, the server resyncs the image, and the
// switch that follows verifies and resumes on B.
TEST_F(LiveHandoff, DamageFoundByTheBackgroundCheckIsResyncedBeforeTheSwitch) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A", {"--block-source", "scan"});
  cluster.startStandby("B", {"--image-check-every", "1"});
  ASSERT_TRUE(cluster.waitForHead(3, kBootAndSync)) << cluster.logOf("A") << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 3; }, kBootAndSync))
      << "the guest on A is not counting" << cluster.logOf("A");
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "B.log").find("hashed the whole image") != std::string::npos; },
                      std::chrono::seconds(30)))
      << cluster.logOf("B");

  ASSERT_NO_FATAL_FAILURE(damageLastDiskBlock(cluster, "B"));
  const std::size_t units = fs::file_size(cluster.stateDir("B") + "/disk.img") / 4096;
  const std::string found = "disk unit " + std::to_string(units - 1) + " no longer holds what checkpoint";
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "B.log").find(found) != std::string::npos; },
                      std::chrono::seconds(30)))
      << "B's background check did not find the damaged block" << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "B.log").find("B: resynced from checkpoint") != std::string::npos; },
                      std::chrono::seconds(60)))
      << "the server did not resync B" << cluster.logOf("B") << cluster.logOf("server");

  std::string fromSerial;
  ASSERT_NO_FATAL_FAILURE(cluster.switchAndWatchTheCounter("A", "B", &fromSerial));
  const std::string logB = readFile(dir / "B.log");
  EXPECT_NE(logB.find("verified ("), std::string::npos) << cluster.logOf("B");
  EXPECT_NE(logB.find("from the hashes kept on apply"), std::string::npos) << cluster.logOf("B");
}

// A standby whose images are on XFS, where io_uring completes buffered writes
// inline, writes them through io_uring, and the handoff to it verifies them
// (the target checks the image digest before it resumes).
TEST_F(LiveHandoff, StandbyOnXfsWritesItsImagesThroughIoUringAndTakesOver) {
  TempDir dir;
  // Mounted before the cluster starts and unmounted after it stops.
  LoopMount xfs("xfs", dir / "B");
  if (!xfs.missing().empty()) VMSYNC_SKIP_OR_FAIL(xfs.missing());
  Cluster cluster(dir.path());
  ASSERT_EQ(cluster.stateDir("B"), xfs.path());
  cluster.startServer();
  cluster.startActive("A");
  cluster.startStandby("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 5; },
                      kBootAndSync))
      << "the guest on A is not counting" << cluster.logOf("A");
  ASSERT_TRUE(cluster.waitForHead(cluster.head() + 2, std::chrono::seconds(60)))
      << cluster.logOf("B");

  std::string aSerial;
  ASSERT_NO_FATAL_FAILURE(cluster.switchAndWatchTheCounter("A", "B", &aSerial));
  const std::string bLog = readFile(dir / "B.log");
  for (const char* image : {"ram.img", "disk.img"})
    EXPECT_NE(bLog.find(std::string(image) +
                        ": io_uring completes writes to it inline; writing through io_uring"),
              std::string::npos)
        << image << " of B was not written through io_uring\n"
        << cluster.logOf("B");
}

}  // namespace
}  // namespace vmsync::testing

namespace vmsync::testing {
namespace {

/// --accel auto must decide within its time limit, say what it chose, and
/// leave a running guest either way. What it says depends on the host: where
/// /dev/kvm does not open it says so, with the reason, and uses tcg; where it
/// opens it boots the guest under KVM and uses kvm, or falls back to tcg.
TEST(AccelAuto, ChoosesAWorkingAcceleratorAndSaysWhich) {
  std::string missing = missingForVm();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  std::string kvmUnusable;  // why this host's /dev/kvm does not open, "" if it does
  const int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) kvmUnusable = std::strerror(errno);
  else ::close(kvm);
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A", {"--accel", "auto"});
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 3; },
                      std::chrono::seconds(180)))
      << cluster.logOf("A");
  std::string log = readFile(dir / "A.log");
  if (!kvmUnusable.empty()) {
    EXPECT_NE(log.find("accel auto: /dev/kvm is not usable (" + kvmUnusable + "); using tcg"), std::string::npos)
        << log;
  } else {
    EXPECT_TRUE(log.find("accel auto: the guest boots under KVM; using kvm") != std::string::npos ||
                log.find("falling back to tcg") != std::string::npos)
        << log;
  }
}

}  // namespace
}  // namespace vmsync::testing

namespace vmsync::testing {
namespace {

/// The server dies (kill -9) while checkpoints flow and comes back on the same
/// data directory: the devices reconnect, nothing is lost, and a switch still
/// ends with a verified image and a counter that goes on.
TEST(ServerRestart, DevicesReconnectAndTheHandoffStillVerifies) {
  std::string missing = missingForVm();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A");
  cluster.startStandby("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 5; },
                      std::chrono::seconds(180)))
      << cluster.logOf("A");
  const std::uint64_t before = cluster.head();
  cluster.server().kill();
  std::this_thread::sleep_for(std::chrono::seconds(3));  // pushes fail meanwhile
  cluster.startServer();
  ASSERT_TRUE(cluster.waitForHead(before + 3, std::chrono::seconds(60))) << cluster.logOf("A") << cluster.logOf("B");
  // Everything A was told is stored, from before the kill and after, is in
  // the store with the digest A logged for it (or folded into the base).
  const ChaosResult stored = checkAcknowledged(dir.path());
  for (const auto& f : stored.failures) ADD_FAILURE() << f;
  EXPECT_EQ(stored.lost, 0u);
  EXPECT_GE(stored.checkedByDigest + stored.folded, 3u) << "no acknowledgements found in A's log";
  std::string aSerial;
  ASSERT_NO_FATAL_FAILURE(cluster.switchAndWatchTheCounter("A", "B", &aSerial));
  EXPECT_NE(readFile(dir / "A.log").find("reconnecting"), std::string::npos);
}

}  // namespace
}  // namespace vmsync::testing

namespace vmsync::testing {
namespace {

/// The disk as a loop device (cache=none) whose block requests the bpf source
/// records in block-device mode; the switch still ends with a verified image.
TEST(LoopDisk, HandoffWithBlockDeviceModeBpf) {
  std::string missing = missingForVm();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  if (::geteuid() != 0) VMSYNC_SKIP_OR_FAIL("loop devices and BPF need root");
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A", {"--disk", "loop", "--block-source", "bpf"});
  cluster.startStandby("B", {"--disk", "loop", "--block-source", "bpf"});
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 5; },
                      std::chrono::seconds(180)))
      << cluster.logOf("A");
  ASSERT_NE(readFile(dir / "A.log").find("block device /dev/loop"), std::string::npos) << cluster.logOf("A");
  ASSERT_TRUE(cluster.waitForHead(cluster.head() + 2, std::chrono::seconds(60))) << cluster.logOf("A");
  nlohmann::json report;
  std::string output;
  ASSERT_EQ(cluster.switchTo("B", &report, &output), 0) << output << cluster.logOf("A") << cluster.logOf("B");
  const std::string aLog = readFile(cluster.serialLog("A"));
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("B"))).size() >= 3; },
                      std::chrono::seconds(60)))
      << cluster.logOf("B");
  ASSERT_TRUE(cluster.waitForHead(cluster.head() + 2, std::chrono::seconds(60))) << cluster.logOf("B");
  ASSERT_EQ(cluster.switchTo("A", &report, &output), 0) << output << cluster.logOf("A") << cluster.logOf("B");
  const std::string bLog = readFile(cluster.serialLog("B"));
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A")).substr(aLog.size())).size() >= 3; },
                      std::chrono::seconds(60)))
      << cluster.logOf("A");
  std::string why;
  EXPECT_TRUE(consecutive(counterValues(aLog + bLog + readFile(cluster.serialLog("A")).substr(aLog.size())), &why))
      << why;
  EXPECT_TRUE(everyFinalScanMatched(readFile(dir / "A.log"), "A", "bpf", 1)) << cluster.logOf("A");
  EXPECT_TRUE(everyFinalScanMatched(readFile(dir / "B.log"), "B", "bpf", 1)) << cluster.logOf("B");
}

}  // namespace
}  // namespace vmsync::testing
