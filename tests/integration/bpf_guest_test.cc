// Invariant of the bpf block source on a real guest, as KVM's dirty_log_test
// does for memory: every disk block whose content changed in a round (found
// by scanning the image) is in the set the source reported for that round.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <set>
#include <thread>

#include "harvest/bpf_block_source.h"
#include "cluster.h"
#include "base/error.h"
#include "vmm/image_file.h"
#include "vmm/loop_device.h"
#include "vmm/qemu_vm.h"
#include "harvest/unit_hashes.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

// File mode: QEMU writes the image file (aio=threads, pwritev). Block device
// mode: QEMU writes a loop device over the image with cache=none, as
// `vmsync active --disk loop` runs it.
class BpfGuest : public ::testing::TestWithParam<BpfBlockSourceOptions::Mode> {};

TEST_P(BpfGuest, EveryChangedBlockIsReportedEveryRound) {
  std::string missing = missingForVm();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  if (::geteuid() != 0) VMSYNC_SKIP_OR_FAIL("loading BPF programs needs root");
  const bool blockDevice = GetParam() == BpfBlockSourceOptions::Mode::BlockDevice;
  TempDir dir;
  const std::string image = guestImage();
  fs::copy_file(image + "/disk.img", dir / "disk.img");
  { ImageFile ram(dir / "ram.img", true, 128u << 20); }
  std::unique_ptr<LoopDevice> loop;
  if (blockDevice) {
    try {
      loop = std::make_unique<LoopDevice>(dir / "disk.img");
    } catch (const Error& error) {
      VMSYNC_SKIP_OR_FAIL(error.what());
    }
  }
  VmConfig config;
  config.memoryBytes = 128u << 20;
  config.kernelPath = image + "/vmlinuz";
  config.initrdPath = image + "/initrd.img";
  config.kernelCmdline = readImageCmdline(image);
  config.ramPath = dir / "ram.img";
  config.diskPath = blockDevice ? loop->path() : dir / "disk.img";
  if (blockDevice) config.diskCache = "none";
  config.serialLogPath = dir / "serial.log";
  config.runDir = dir / "run";
  QemuVm vm(config);  // started paused: no write can happen before the source watches

  BpfBlockSourceOptions options;
  options.mode = GetParam();
  if (blockDevice) {
    options.blockDevicePath = loop->path();
  } else {
    options.vmmPid = vm.pid();
    options.imageFd = findFileDescriptor(vm.pid(), config.diskPath);
  }
  auto probe = tryCreateBpfBlockSource(options);
  if (!probe.source)
    VMSYNC_SKIP_OR_FAIL("bpf block source unavailable: " + probe.unavailableReason);
  ImageFile disk(dir / "disk.img", false);
  std::vector<std::uint64_t> previous = hashAllUnits(disk);
  vm.cont();
  // The first round covers the boot (everything written since the VMM
  // started); the others the counter writing its file every 100 ms.
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(config.serialLogPath)).size() >= 1; },
                      std::chrono::seconds(120)));

  int rounds = 0, roundsWithWrites = 0, rescans = 0;
  std::uint64_t reportedTotal = 0;
  for (int round = 0; round < 20; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
    vm.stop();  // the VMM's writes have all returned (QEMU drains its disk requests)
    DirtyUnits reported = probe.source->harvest();
    std::vector<std::uint64_t> now = hashAllUnits(disk);
    vm.cont();
    ++rounds;
    if (reported.everything) {
      ++rescans;
      previous = now;
      continue;
    }
    std::set<std::uint64_t> set(reported.units.begin(), reported.units.end());
    reportedTotal += set.size();
    std::vector<std::uint64_t> missed;
    for (std::uint64_t i = 0; i < now.size(); ++i)
      if (now[i] != previous[i] && !set.count(i)) missed.push_back(i);
    bool changed = false;
    for (std::uint64_t i = 0; i < now.size(); ++i) changed |= now[i] != previous[i];
    roundsWithWrites += changed;
    ASSERT_TRUE(missed.empty()) << "round " << round << ": " << missed.size()
                                << " changed blocks not reported, first " << missed.front() << " ("
                                << set.size() << " reported)";
    previous = now;
  }
  EXPECT_GE(roundsWithWrites, 10) << "the guest should write its counter file every round";
  EXPECT_LT(rescans, rounds / 2) << "the source fell back to rescans too often";
  std::printf(
      "bpf guest invariant (%s): %d rounds, %d with writes, %d rescans, %llu blocks reported\n",
      blockDevice ? "block device" : "file", rounds, roundsWithWrites, rescans,
      static_cast<unsigned long long>(reportedTotal));
  vm.quit();
}

INSTANTIATE_TEST_SUITE_P(Modes, BpfGuest,
                         ::testing::Values(BpfBlockSourceOptions::Mode::File,
                                           BpfBlockSourceOptions::Mode::BlockDevice),
                         [](const auto& info) {
                           return info.param == BpfBlockSourceOptions::Mode::File ? "File"
                                                                                  : "BlockDevice";
                         });

}  // namespace
}  // namespace vmsync::testing
