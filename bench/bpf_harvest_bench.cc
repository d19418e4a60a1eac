// Cost of one disk harvest on a 1 GiB image with 0.1 %, 1 % and 10 % of its
// blocks written since the previous one:
// - Scan: read every 4 KiB block (from the page cache: the scan's best case),
//   xxh3 it and compare with the previous hash: what the scan source costs.
// - Bpf: BpfBlockSource::harvest() in file mode (this process writes the
//   image with pwrite), draining the ring in harvest (no background thread),
//   so the timing includes folding every record.
// - BpfThenHashDirty: the harvest plus reading and hashing the reported
//   blocks, the part of the scan's work a checkpoint still needs.
// The writes themselves are outside the timing; BM_Pwrite measures what the
// tracing adds to each 4 KiB pwrite of the VMM (arg 0: untraced, 1: traced). Needs root (BPF);
// elsewhere the bpf cases report an error with the reason.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "harvest/bpf_block_source.h"
#include "base/error.h"
#include "base/units.h"

namespace vmsync {
namespace {

constexpr std::uint64_t kImageBytes = std::uint64_t{1} << 30;
constexpr std::uint64_t kBlocks = kImageBytes / kUnitSize;

// The 1 GiB image, created once for all cases and removed at exit.
class BenchImage {
 public:
  BenchImage() {
    std::string pattern = (std::filesystem::temp_directory_path() / "vmsync-bench-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) throwLastErrno("cannot create a temporary directory");
    directory_ = pattern;
    path_ = directory_ + "/disk.img";
    fd_ = ::open(path_.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    if (fd_ < 0) throwLastErrno(fmt::format("cannot create {}", path_));
    std::vector<std::uint64_t> chunk((1 << 20) / 8);
    std::mt19937_64 random(1);
    for (std::uint64_t done = 0; done < kImageBytes; done += 1 << 20) {
      for (auto& word : chunk) word = random();
      if (::pwrite(fd_, chunk.data(), 1 << 20, static_cast<off_t>(done)) != 1 << 20)
        throwLastErrno(fmt::format("cannot fill {}", path_));
    }
  }
  ~BenchImage() {
    ::close(fd_);
    std::error_code ignored;
    std::filesystem::remove_all(directory_, ignored);
  }
  int fd() const { return fd_; }

  /// Writes `count` random whole blocks with fresh bytes.
  void writeRandomBlocks(std::uint64_t count) {
    alignas(64) std::uint64_t block[kUnitSize / 8];
    for (std::uint64_t i = 0; i < count; ++i) {
      for (auto& word : block) word = random_();
      off_t offset = static_cast<off_t>((random_() % kBlocks) * kUnitSize);
      if (::pwrite(fd_, block, kUnitSize, offset) != static_cast<ssize_t>(kUnitSize))
        throwLastErrno("cannot write the bench image");
    }
  }

 private:
  std::string directory_;
  std::string path_;
  int fd_ = -1;
  std::mt19937_64 random_{2};
};

BenchImage& image() {
  static BenchImage instance;
  return instance;
}

std::uint64_t writtenBlocks(const benchmark::State& state) {
  return kBlocks * static_cast<std::uint64_t>(state.range(0)) / 1000;
}

void setLabel(benchmark::State& state) {
  state.SetLabel(fmt::format("{:.1f}% of 1 GiB written ({} blocks)", state.range(0) / 10.0,
                             writtenBlocks(state)));
}

// Hashes every block and counts those whose hash changed.
void BM_ScanHarvest(benchmark::State& state) {
  BenchImage& bench = image();
  std::vector<std::uint64_t> hashes(kBlocks, 0);
  std::vector<char> buffer(1 << 20);
  for (auto _ : state) {
    state.PauseTiming();
    bench.writeRandomBlocks(writtenBlocks(state));
    state.ResumeTiming();
    std::uint64_t changed = 0;
    for (std::uint64_t offset = 0; offset < kImageBytes; offset += buffer.size()) {
      if (::pread(bench.fd(), buffer.data(), buffer.size(), static_cast<off_t>(offset)) !=
          static_cast<ssize_t>(buffer.size()))
        throwLastErrno("cannot read the bench image");
      for (std::size_t at = 0; at < buffer.size(); at += kUnitSize) {
        std::uint64_t hash = XXH3_64bits(buffer.data() + at, kUnitSize);
        std::uint64_t& old = hashes[(offset + at) / kUnitSize];
        changed += hash != old;
        old = hash;
      }
    }
    benchmark::DoNotOptimize(changed);
  }
  setLabel(state);
}

void runBpf(benchmark::State& state, bool hashDirty) {
  BenchImage& bench = image();
  BpfBlockSourceOptions options;
  options.mode = BpfBlockSourceOptions::Mode::File;
  options.vmmPid = ::getpid();
  options.imageFd = bench.fd();
  options.ringBytes = 4 << 20;  // 26214 records of 32 bytes fit
  options.drainInBackground = false;
  auto probe = tryCreateBpfBlockSource(options);
  if (!probe.source) {
    state.SkipWithError(("bpf block source unavailable: " + probe.unavailableReason).c_str());
    return;
  }
  BpfBlockSource& source = *probe.source;
  source.harvest();
  alignas(64) char block[kUnitSize];
  std::uint64_t rescans = 0;
  for (auto _ : state) {
    state.PauseTiming();
    bench.writeRandomBlocks(writtenBlocks(state));
    state.ResumeTiming();
    DirtyUnits dirty = source.harvest();
    rescans += dirty.everything;
    if (hashDirty) {
      std::uint64_t sum = 0;
      for (std::uint64_t unit : dirty.units) {
        if (::pread(bench.fd(), block, kUnitSize, static_cast<off_t>(unit * kUnitSize)) !=
            static_cast<ssize_t>(kUnitSize))
          throwLastErrno("cannot read the bench image");
        sum += XXH3_64bits(block, kUnitSize);
      }
      benchmark::DoNotOptimize(sum);
    }
    benchmark::DoNotOptimize(dirty);
  }
  if (rescans)
    state.SkipWithError(fmt::format("{} harvests fell back to a rescan", rescans).c_str());
  setLabel(state);
}

void BM_BpfHarvest(benchmark::State& state) { runBpf(state, false); }
void BM_BpfHarvestThenHashDirty(benchmark::State& state) { runBpf(state, true); }

void BM_Pwrite(benchmark::State& state) {
  BenchImage& bench = image();
  std::unique_ptr<BpfBlockSource> source;
  if (state.range(0)) {
    BpfBlockSourceOptions options;
    options.mode = BpfBlockSourceOptions::Mode::File;
    options.vmmPid = ::getpid();
    options.imageFd = bench.fd();
    auto probe = tryCreateBpfBlockSource(options);  // drains in the background
    if (!probe.source) {
      state.SkipWithError(("bpf block source unavailable: " + probe.unavailableReason).c_str());
      return;
    }
    source = std::move(probe.source);
  }
  alignas(64) char block[kUnitSize] = {1};
  std::uint64_t unit = 0;
  for (auto _ : state) {
    if (::pwrite(bench.fd(), block, kUnitSize, static_cast<off_t>(unit * kUnitSize)) !=
        static_cast<ssize_t>(kUnitSize))
      throwLastErrno("cannot write the bench image");
    unit = (unit + 1) % kBlocks;
  }
  if (source && source->harvest().everything)
    state.SkipWithError("records were lost while measuring");
  state.SetLabel(state.range(0) ? "traced" : "untraced");
}
BENCHMARK(BM_Pwrite)->Arg(0)->Arg(1);

// Per-mille of the image's blocks written between two harvests.
#define VMSYNC_HARVEST_CASES(bench) \
  BENCHMARK(bench)->Arg(1)->Arg(10)->Arg(100)->Iterations(20)->Unit(benchmark::kMillisecond)

VMSYNC_HARVEST_CASES(BM_ScanHarvest);
VMSYNC_HARVEST_CASES(BM_BpfHarvest);
VMSYNC_HARVEST_CASES(BM_BpfHarvestThenHashDirty);

}  // namespace
}  // namespace vmsync
