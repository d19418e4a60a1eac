// The active VM's VMM and its dirty sources: how QEMU is configured on the
// replica's images, the loop device for --disk loop, and which page and block
// sources watch it (split from active_vm.cc, which runs the checkpoints).
#include <spdlog/spdlog.h>

#include <set>

#include "base/error.h"
#include "daemon/active_vm.h"
#include "harvest/bpf_block_source.h"
#include "harvest/kmod_page_source.h"

namespace vmsync {

VmConfig vmConfigFor(const DeviceOptions& options, const Replica& replica, const LoopDevice* loop, bool incoming) {
  const LocalSpec& spec = replica.spec();
  VmConfig config;
  config.qemuBinary = options.qemuBinary;
  config.accel = spec.accel;
  config.cpuModel = spec.cpuModel;
  config.memoryBytes = spec.memoryBytes;
  config.vcpus = spec.vcpus;
  config.freePageReporting = spec.freePageReporting;
  config.kernelPath = replica.path("vmlinuz");
  config.initrdPath = replica.path("initrd.img");
  config.kernelCmdline = spec.cmdline;
  config.ramPath = replica.path("ram.img");
  config.diskPath = replica.path("disk.img");
  if (loop) {
    // The VMM writes the loop device; its requests are what the bpf source sees.
    config.diskPath = loop->path();
    config.diskCache = "none";
  }
  config.serialLogPath = replica.path("serial.log");
  config.runDir = replica.path("run");
  config.incoming = incoming;
  return config;
}

void RetiredVmm::quit() {
  blockSource.reset();
  if (vm) vm->quit();
  vm.reset();
  loop.reset();
}

void ActiveVm::setUpDisk() {
  if (options_.disk == "file") return;
  if (options_.disk != "loop") fail("--disk must be file or loop, not '{}'", options_.disk);
  loop_ = std::make_unique<LoopDevice>(replica_.path("disk.img"));
  spdlog::info("{}: guest disk on {} over {}", options_.deviceId, loop_->path(), replica_.path("disk.img"));
}

void ActiveVm::attachSources() {
  // Called with the VMM started but paused: nothing the guest writes can
  // happen before the sources watch.
  attachPageSource();
  attachBlockSource();
}

void ActiveVm::attachPageSource() {
  // kmod reads KVM's dirty log through vmsync.ko; auto takes it when both are there.
  const std::string& accel = replica_.spec().accel;
  const std::string kmodMissing =
      accel != "kvm" ? fmt::format("the VM runs under {}, not kvm", accel) : KmodPageSource::unavailableReason();
  if (options_.pageSource == "kmod" && !kmodMissing.empty())
    fail("--page-source kmod is not available: {}", kmodMissing);
  if (options_.pageSource == "kmod" || (options_.pageSource == "auto" && kmodMissing.empty()))
    pageSource_ = std::make_unique<KmodPageSource>(vm_->pid(), qemuQ35GfnRanges(replica_.spec().memoryBytes));
  else if (options_.pageSource == "scan" || options_.pageSource == "auto")
    pageSource_ = std::make_unique<ScanPageSource>();
  else
    fail("--page-source must be scan, kmod or auto, not '{}'", options_.pageSource);
}

void ActiveVm::attachBlockSource() {
  if (options_.blockSource == "scan") {
    blockSource_ = std::make_unique<ScanBlockSource>();
    return;
  }
  BpfBlockSourceOptions bpf;
  if (loop_) {
    bpf.mode = BpfBlockSourceOptions::Mode::BlockDevice;
    bpf.blockDevicePath = loop_->path();
  } else {
    bpf.mode = BpfBlockSourceOptions::Mode::File;
    bpf.vmmPid = vm_->pid();
    bpf.imageFd = findFileDescriptor(vm_->pid(), replica_.path("disk.img"));
  }
  bpf.maxImageBytes = replica_.spec().diskBytes;
  if (options_.blockSource == "bpf") {
    auto source = std::make_unique<BpfBlockSource>(bpf);
    spdlog::info("{}: block source bpf: {}", options_.deviceId, source->description());
    blockSource_ = std::move(source);
    return;
  }
  auto probe = tryCreateBpfBlockSource(bpf);
  if (probe.source) {
    spdlog::info("{}: block source auto: bpf ({})", options_.deviceId, probe.source->description());
    blockSource_ = std::move(probe.source);
  } else {
    spdlog::info("{}: block source auto: bpf unavailable ({}); using scan", options_.deviceId,
                 probe.unavailableReason);
    blockSource_ = std::make_unique<ScanBlockSource>();
  }
}

std::uint64_t ActiveVm::warnIfMissed(const std::string& source, const DirtyUnits& reported,
                                     const ImageDelta& delta) {
  if (reported.everything) return 0;
  std::set<std::uint64_t> seen(reported.units.begin(), reported.units.end());
  std::uint64_t missed = 0;
  for (const auto& unit : delta.units) missed += !seen.count(unit.index);
  // Units of an earlier failed push are expected here too; anything else is a source bug.
  if (missed == 0)
    spdlog::info("{}: the final scan found {} changed units, each reported by the {} source", options_.deviceId,
                 delta.units.size(), source);
  else
    spdlog::warn("{}: the final scan found {} changed units the {} source did not report since the last "
                 "checkpoint (units of a failed push count here); the final checkpoint carries them",
                 options_.deviceId, missed, source);
  return missed;
}

}  // namespace vmsync
