#include "lab/study.h"

#include <spdlog/spdlog.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <thread>

#include "checkpoint/chunk_codec.h"
#include "base/durable_file.h"
#include "base/error.h"
#include "vmm/image_file.h"
#include "vmm/qemu_vm.h"
#include "harvest/unit_hashes.h"
#include "lab/gnuplot.h"
#include "lab/study_energy.h"
#include "lab/study_compression.h"
#include "lab/machine_usage.h"
#include "base/units.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

/// Guest RAM followed by the guest disk, as one array of units.
class VmImage {
 public:
  VmImage(const std::string& ram, const std::string& disk)
      : ram_(ram, false), disk_(disk, false), ramUnits_(ram_.units()) {}
  std::uint64_t units() const { return ramUnits_ + disk_.units(); }
  std::uint64_t bytes() const { return units() * kUnitSize; }
  std::span<const std::byte> unit(std::uint64_t i) const {
    return i < ramUnits_ ? ram_.unit(i) : disk_.unit(i - ramUnits_);
  }

 private:
  ImageFile ram_;
  ImageFile disk_;
  std::uint64_t ramUnits_;
};

/// A copy of the image at some moment: the reference a policy measures against.
struct Snapshot {
  std::vector<std::byte> bytes;
  std::vector<std::uint64_t> hashes;

  void take(const VmImage& image, const std::vector<std::uint64_t>& liveHashes) {
    bytes.resize(image.bytes());
    for (std::uint64_t i = 0; i < image.units(); ++i)
      std::memcpy(bytes.data() + i * kUnitSize, image.unit(i).data(), kUnitSize);
    hashes = liveHashes;
  }
  std::span<const std::byte> unit(std::uint64_t i) const { return {bytes.data() + i * kUnitSize, kUnitSize}; }
};

/// What one checkpoint would cost under the Dirty and the Diff encodings.
struct Measure {
  std::uint64_t pages = 0;          // units that differ from the reference
  std::uint64_t changedBytes = 0;   // bytes that differ
  std::uint64_t dirtyBytes = 0;     // Dirty: whole units (zero units cost nothing)
  std::uint64_t dirtyLz4 = 0;
  std::uint64_t diffBytes = 0;      // Diff: XOR runs
  std::uint64_t diffLz4 = 0;
  double compareMs = 0;             // CPU: find the changed units (hashes given)
  double dirtyEncodeMs = 0;         // CPU: encode whole + lz4
  double diffEncodeMs = 0;          // CPU: encode diff + lz4
};

Measure measure(const VmImage& image, const std::vector<std::uint64_t>& liveHashes, const Snapshot& reference) {
  Measure m;
  std::vector<std::uint64_t> changed;
  double t0 = threadCpuMs();
  for (std::uint64_t i = 0; i < image.units(); ++i)
    if (liveHashes[i] != reference.hashes[i]) changed.push_back(i);
  double t1 = threadCpuMs();
  m.compareMs = t1 - t0;
  m.pages = changed.size();
  for (auto i : changed) {
    auto live = image.unit(i);
    m.changedBytes += changedBytes(live, reference.unit(i));
    if (!isZeroUnit(live)) m.dirtyBytes += kUnitSize;
    m.dirtyLz4 += encodeWhole(i, live, true).data.size();
  }
  double t2 = threadCpuMs();
  for (auto i : changed) {
    auto live = image.unit(i);
    m.diffBytes += encodeDiff(i, live, reference.unit(i), false).data.size();
    m.diffLz4 += encodeDiff(i, live, reference.unit(i), true).data.size();
  }
  double t3 = threadCpuMs();
  m.dirtyEncodeMs = t2 - t1;
  m.diffEncodeMs = t3 - t2;
  return m;
}

/// Totals of one run, per interval.
struct RunTotals {
  std::map<std::uint32_t, double> incrDirty, incrDiff, incrDirtyLz4, incrDiffLz4;
  double finalDirty = 0, finalDiff = 0, finalDirtyLz4 = 0, finalDiffLz4 = 0;
  std::map<std::string, std::vector<double>> cpuMsPerCheckpoint;  // policy -> samples
  std::map<std::uint32_t, double> dirtyPrevOverDiffPrev;
  StudyPushes pushes;  // every checkpoint as a device would push it (lz4), for the energy accounting
  std::uint64_t imageBytes = 0;
  std::uint64_t units = 0;
  CompressionTally compression;  // bytes and CPU per compression choice
};

void writeRow(std::ofstream& csv, int run, std::uint32_t t, std::uint32_t interval, const char* kind,
              const char* policy, const Measure& m, bool diff, double hashMs) {
  const double encodeMs = diff ? m.diffEncodeMs : m.dirtyEncodeMs;
  csv << run << ',' << t << ',' << interval << ',' << kind << ',' << policy << ',' << m.pages << ','
      << m.changedBytes << ',' << (diff ? m.diffBytes : m.dirtyBytes) << ',' << (diff ? m.diffLz4 : m.dirtyLz4) << ','
      << fmt::format("{:.3f}", hashMs + m.compareMs) << ',' << fmt::format("{:.3f}", encodeMs) << '\n';
}

std::string readSerial(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void progressBar(bool enabled, int run, int runs, std::uint32_t t, std::uint32_t total) {
  if (!enabled) return;
  const int width = 40;
  int filled = total ? static_cast<int>(width * t / total) : width;
  std::fprintf(stderr, "\r  run %d/%d [%s%s] %3u/%u s", run, runs, std::string(filled, '#').c_str(),
               std::string(width - filled, ' ').c_str(), t, total);
  if (t == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

/// Adds what the checkpoint of interval `k` costs under each compression.
void measureCompression(CompressionTally& tally, std::uint32_t k, const VmImage& live,
                        const std::vector<std::uint64_t>& hashes, const Snapshot& previous, const Snapshot& base) {
  auto liveUnit = [&](std::uint64_t i) { return live.unit(i); };
  tally.add(k, measureChoices(liveUnit, hashes, [&](std::uint64_t i) { return previous.unit(i); }, previous.hashes),
            measureChoices(liveUnit, hashes, [&](std::uint64_t i) { return base.unit(i); }, base.hashes));
}

RunTotals runOnce(const StudyOptions& options, int run, std::ofstream& csv) {
  const fs::path image(options.imageDir);
  const fs::path dir = fs::path(options.outDir) / fmt::format("run-{}", run);
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::uint32_t memoryMb = 128;
  if (fs::exists(image / "spec.json")) {
    auto j = nlohmann::json::parse(readWholeFile((image / "spec.json").string(), 1 << 20));
    memoryMb = j.value("memory_mb", 128u);
  }
  copySparse((image / "disk.img").string(), (dir / "disk.img").string());
  { ImageFile ram((dir / "ram.img").string(), true, std::uint64_t{memoryMb} << 20); }
  const std::string cmdline = readImageCmdline(image.string());
  VmConfig config;
  config.qemuBinary = options.qemuBinary;
  config.memoryBytes = std::uint64_t{memoryMb} << 20;
  config.freePageReporting = true;  // as a VM created now has it
  config.kernelPath = (image / "vmlinuz").string();
  config.initrdPath = (image / "initrd.img").string();
  config.kernelCmdline = fmt::format("{} vmsync.duration={}", cmdline, options.durationSeconds + 30);
  config.ramPath = (dir / "ram.img").string();
  config.diskPath = (dir / "disk.img").string();
  config.serialLogPath = (dir / "serial.log").string();
  config.runDir = (dir / "run").string();
  config.accel = resolveAccel(options.accel, config);

  QemuVm vm(config);
  vm.cont();
  // Measure the workload, not the boot: start when the guest says it starts.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
  while (readSerial(config.serialLogPath).find("vmsync-guest: workload") == std::string::npos) {
    if (std::chrono::steady_clock::now() > deadline) fail("the guest did not start its workload within 300 s");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }

  VmImage live(config.ramPath, config.diskPath);
  RunTotals totals;
  totals.imageBytes = live.bytes();
  totals.units = live.units();
  std::vector<std::uint64_t> hashes(live.units());
  auto hashLive = [&] {
    double t0 = threadCpuMs();
    for (std::uint64_t i = 0; i < live.units(); ++i) hashes[i] = hashUnit(live.unit(i));
    return threadCpuMs() - t0;
  };

  vm.stop();
  hashLive();
  Snapshot base;
  base.take(live, hashes);
  std::map<std::uint32_t, Snapshot> previous;  // per interval: the image at its last checkpoint
  for (auto k : options.intervals) previous[k] = base;
  vm.cont();

  const std::uint32_t total = options.durationSeconds;
  for (std::uint32_t t = 1; t <= total; ++t) {
    std::this_thread::sleep_for(std::chrono::seconds(1));  // the guest runs; it does not see the pauses
    vm.stop();
    const double hashMs = hashLive();
    const bool last = t == total;
    bool any = last;
    for (auto k : options.intervals) any |= t % k == 0;
    if (any) {
      Measure orig = measure(live, hashes, base);
      for (auto k : options.intervals) {
        if (t % k != 0 && !last) continue;
        const char* kind = last ? "final" : "incremental";
        Measure prev = measure(live, hashes, previous[k]);
        measureCompression(totals.compression, k, live, hashes, previous[k], base);
        writeRow(csv, run, t, k, kind, "dirty-prev", prev, false, hashMs);
        writeRow(csv, run, t, k, kind, "diff-prev", prev, true, hashMs);
        writeRow(csv, run, t, k, kind, "dirty-orig", orig, false, hashMs);
        writeRow(csv, run, t, k, kind, "diff-orig", orig, true, hashMs);
        totals.incrDirty[k] += static_cast<double>(prev.dirtyBytes);
        totals.incrDiff[k] += static_cast<double>(prev.diffBytes);
        totals.incrDirtyLz4[k] += static_cast<double>(prev.dirtyLz4);
        totals.incrDiffLz4[k] += static_cast<double>(prev.diffLz4);
        const std::pair<const char*, std::pair<std::uint64_t, double>> costs[] = {
            {"dirty-prev", {prev.dirtyLz4, hashMs + prev.compareMs + prev.dirtyEncodeMs}},
            {"diff-prev", {prev.diffLz4, hashMs + prev.compareMs + prev.diffEncodeMs}},
            {"dirty-orig", {orig.dirtyLz4, hashMs + orig.compareMs + orig.dirtyEncodeMs}},
            {"diff-orig", {orig.diffLz4, hashMs + orig.compareMs + orig.diffEncodeMs}}};
        for (const auto& [policy, cost] : costs) {
          totals.cpuMsPerCheckpoint[policy].push_back(cost.second);
          totals.pushes[policy][k].push_back(
              {.timeSeconds = static_cast<double>(t), .bytes = cost.first, .cpuSeconds = cost.second / 1000});
        }
        previous[k].take(live, hashes);
      }
      if (last) {
        totals.finalDirty = static_cast<double>(orig.dirtyBytes);
        totals.finalDiff = static_cast<double>(orig.diffBytes);
        totals.finalDirtyLz4 = static_cast<double>(orig.dirtyLz4);
        totals.finalDiffLz4 = static_cast<double>(orig.diffLz4);
      }
    }
    vm.cont();
    progressBar(options.progress, run, static_cast<int>(options.repeat), t, total);
  }
  for (auto k : options.intervals)
    totals.dirtyPrevOverDiffPrev[k] = totals.incrDiff[k] > 0 ? totals.incrDirty[k] / totals.incrDiff[k] : 0;
  vm.quit();
  fs::remove(dir / "ram.img");
  fs::remove(dir / "disk.img");
  return totals;
}

struct Spread {
  double min = 0, median = 0, max = 0;
};

Spread spread(std::vector<double> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  double median = v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
  return {v.front(), median, v.back()};
}

std::string mib(double bytes) { return fmt::format("{:.2f}", bytes / (1 << 20)); }

std::string cell(const Spread& s, bool repeated) {
  return repeated ? fmt::format("{} ({}–{})", mib(s.median), mib(s.min), mib(s.max)) : mib(s.median);
}

void writePlots(const StudyOptions& options) {
  const fs::path out(options.outDir);
  const std::uint32_t first = options.intervals.front();
  std::ostringstream gp;
  gp << gnuplotPreamble(1000, 600) << "set datafile separator ','\n"
     << "set output " << gnuplotQuote((out / "checkpoint_size.png").string()) << "\n"
     << "set title "
     << gnuplotQuote(fmt::format("Checkpoint size over time, workload {}, interval {} s, run 1", options.workload, first))
     << "\n"
     << "set xlabel 'time (s)'\nset ylabel 'checkpoint size (MiB)'\n"
     << "plot for [p in 'dirty-orig diff-orig dirty-prev diff-prev'] " << gnuplotQuote((out / "checkpoints.csv").string())
     << " using ($1==1 && $3==" << first << " && strcol(5) eq p ? $2 : 1/0):($8/1048576.0) with linespoints "
     << "title p\n"
     << "set output " << gnuplotQuote((out / "total_bytes.png").string()) << "\n"
     << "set title "
     << gnuplotQuote(fmt::format("Total bytes to sync by interval, workload {} (median of runs)", options.workload))
     << "\n"
     << "set style data histogram\nset style histogram cluster gap 1\nset style fill solid 0.8 border -1\n"
     << "set xlabel 'checkpoint interval (s)'\nset ylabel 'MiB'\nset key top left\n"
     << "plot " << gnuplotQuote((out / "summary.csv").string())
     << " using ($2/1048576.0):xtic(1) every ::1 title 'Final Dirty', '' using ($3/1048576.0) every ::1 "
        "title 'Final Diff', '' using ($4/1048576.0) every ::1 title 'Incr Dirty', '' using ($5/1048576.0) "
        "every ::1 title 'Incr Diff'\n";
  drawPlots("study", (out / "plots.gp").string(), gp.str(),
            {(out / "checkpoint_size.png").string(), (out / "total_bytes.png").string()});
}

void writeCompression(std::ostream& md, const std::vector<RunTotals>& runs) {
  std::vector<CompressionTally> tallies;
  std::vector<std::map<std::uint32_t, double>> incrDirty;
  for (const auto& run : runs) {
    tallies.push_back(run.compression);
    incrDirty.push_back(run.incrDirty);
  }
  writeCompressionSection(md, tallies, incrDirty);
}

}  // namespace

int runStudy(const StudyOptions& options) {
  try {
    if (options.imageDir.empty()) fail("--image is required");
    for (const char* name : {"vmlinuz", "initrd.img", "disk.img", "cmdline"})
      if (!fs::exists(fs::path(options.imageDir) / name))
        fail("guest image {} has no {}; build it with vm-images/build.sh --workload {}", options.imageDir, name,
             options.workload);
    if (options.intervals.empty()) fail("--intervals needs at least one interval");
    for (auto k : options.intervals)
      if (k == 0) fail("intervals are whole seconds, at least 1");
    if (options.durationSeconds == 0) fail("--duration must be at least 1 s");
    if (options.repeat == 0) fail("--repeat must be at least 1");
    fs::create_directories(options.outDir);
    std::ofstream csv(fs::path(options.outDir) / "checkpoints.csv");
    csv << "run,time_s,interval_s,kind,policy,pages,changed_bytes,encoded_bytes,lz4_bytes,harvest_cpu_ms,"
           "encode_cpu_ms\n";
    std::vector<RunTotals> runs;
    for (std::uint32_t r = 1; r <= options.repeat; ++r) {
      spdlog::info("study: workload {}, run {}/{}, {} s", options.workload, r, options.repeat,
                   options.durationSeconds);
      runs.push_back(runOnce(options, static_cast<int>(r), csv));
      csv.flush();
    }
    const bool repeated = runs.size() > 1;
    auto across = [&](auto get) {
      std::vector<double> v;
      for (const auto& run : runs) v.push_back(get(run));
      return spread(v);
    };

    std::ofstream summary(fs::path(options.outDir) / "summary.csv");
    summary << "interval_s,final_dirty,final_diff,incr_dirty,incr_diff,final_dirty_lz4,final_diff_lz4,"
               "incr_dirty_lz4,incr_diff_lz4,dirty_prev_over_diff_prev\n";
    for (auto k : options.intervals) {
      summary << k << ',' << across([](auto& r) { return r.finalDirty; }).median << ','
              << across([](auto& r) { return r.finalDiff; }).median << ','
              << across([k](auto& r) { return r.incrDirty.at(k); }).median << ','
              << across([k](auto& r) { return r.incrDiff.at(k); }).median << ','
              << across([](auto& r) { return r.finalDirtyLz4; }).median << ','
              << across([](auto& r) { return r.finalDiffLz4; }).median << ','
              << across([k](auto& r) { return r.incrDirtyLz4.at(k); }).median << ','
              << across([k](auto& r) { return r.incrDiffLz4.at(k); }).median << ','
              << fmt::format("{:.3f}", across([k](auto& r) { return r.dirtyPrevOverDiffPrev.at(k); }).median)
              << '\n';
    }
    summary.close();

    const auto& first = runs.front();
    std::ofstream md(fs::path(options.outDir) / "report.md");
    md << "# vmsync study: workload `" << options.workload << "`\n\n"
       << options.repeat << " run(s) of " << options.durationSeconds << " s each, measured from the moment the "
       << "workload starts; guest image of " << mib(static_cast<double>(first.imageBytes)) << " MiB (RAM + disk, "
       << first.units << " units of 4 KiB). Every policy and interval is computed from the same run: the VM is "
       << "paused for a moment every second and each policy measures the same image.\n\n"
       << "## Total bytes to sync (MiB" << (repeated ? "; median (min–max) over runs" : "") << ")\n\n"
       << "Final: one checkpoint at the switch, against the original image. Incr: every checkpoint at the "
       << "interval plus the final one, each against the previous.\n\n"
       << "| interval (s) | Final Dirty | Final Diff | Incr Dirty | Incr Diff | Final Dirty lz4 | Final Diff lz4 | "
          "Incr Dirty lz4 | Incr Diff lz4 |\n|---|---|---|---|---|---|---|---|---|\n";
    for (auto k : options.intervals) {
      md << "| " << k << " | " << cell(across([](auto& r) { return r.finalDirty; }), repeated) << " | "
         << cell(across([](auto& r) { return r.finalDiff; }), repeated) << " | "
         << cell(across([k](auto& r) { return r.incrDirty.at(k); }), repeated) << " | "
         << cell(across([k](auto& r) { return r.incrDiff.at(k); }), repeated) << " | "
         << cell(across([](auto& r) { return r.finalDirtyLz4; }), repeated) << " | "
         << cell(across([](auto& r) { return r.finalDiffLz4; }), repeated) << " | "
         << cell(across([k](auto& r) { return r.incrDirtyLz4.at(k); }), repeated) << " | "
         << cell(across([k](auto& r) { return r.incrDiffLz4.at(k); }), repeated) << " |\n";
    }
    md << "\n## Whole dirty pages versus changed bytes\n\n"
       << "Bickford & Cáceres report whole dirty pages at about 3x the changed bytes (Dirty Prev / Diff Prev) "
       << "for video playback. Measured here for `" << options.workload << "`:\n\n"
       << "| interval (s) | Dirty Prev / Diff Prev | paper (video) |\n|---|---|---|\n";
    for (auto k : options.intervals) {
      auto s = across([k](auto& r) { return r.dirtyPrevOverDiffPrev.at(k); });
      md << "| " << k << " | "
         << (repeated ? fmt::format("{:.2f} ({:.2f}–{:.2f})", s.median, s.min, s.max) : fmt::format("{:.2f}", s.median))
         << " | ~3 |\n";
    }
    md << "\n## Overheads per policy\n\n"
       << "Time: CPU per checkpoint (hash the image, find changed units, encode with lz4), median over all "
       << "checkpoints of all runs. Space: reference copies the active device keeps for the policy (hashes are "
       << "8 bytes per unit; a copy is the whole image); a standby under Orig also keeps the base image.\n\n"
       << "| policy | CPU per checkpoint (ms) | reference kept by the active device |\n|---|---|---|\n";
    const double hashesMiB = static_cast<double>(first.units) * 8 / (1 << 20);
    const double imageMiB = static_cast<double>(first.imageBytes) / (1 << 20);
    const std::map<std::string, std::string> space{
        {"dirty-prev", fmt::format("hashes only: {:.2f} MiB", hashesMiB)},
        {"diff-prev", fmt::format("copy of the last checkpoint: {:.2f} MiB + hashes", imageMiB)},
        {"dirty-orig", fmt::format("base hashes: {:.2f} MiB (standby: base image {:.2f} MiB)", hashesMiB, imageMiB)},
        {"diff-orig", fmt::format("base image: {:.2f} MiB + hashes", imageMiB)}};
    for (const char* p : {"dirty-prev", "diff-prev", "dirty-orig", "diff-orig"}) {
      std::vector<double> all;
      for (const auto& r : runs) {
        const auto& v = r.cpuMsPerCheckpoint.at(p);
        all.insert(all.end(), v.begin(), v.end());
      }
      md << "| " << p << " | " << fmt::format("{:.1f}", spread(all).median) << " | " << space.at(p) << " |\n";
    }
    std::vector<std::vector<StudyEnergyRow>> energyRuns;
    for (const auto& run : runs) energyRuns.push_back(studyEnergy(run.pushes, options.durationSeconds));
    md << writeStudyEnergy(options.outDir, options.workload, energyRuns);
    writeCompression(md, runs);
    md << "\n## Files\n\n- `checkpoints.csv`: one row per checkpoint, interval and policy (pages, changed bytes, "
       << "encoded bytes, lz4 bytes, CPU to harvest and to encode)\n- `summary.csv`: the totals above\n"
       << "- `checkpoint_size.png`: checkpoint size over time per policy (first interval, run 1)\n"
       << "- `total_bytes.png`: Final/Incr Dirty/Diff per interval\n"
       << "- `energy.csv`: bytes, CPU and joules per minute for every policy, interval and link\n"
       << "- `energy_wifi.png`, `energy_lte.png`, `energy_3g.png`: bytes and joules per minute against the "
          "interval\n- `run-N/serial.log`: the guest's console\n";
    md.close();
    writePlots(options);
    spdlog::info("study: report in {}", (fs::path(options.outDir) / "report.md").string());
    return 0;
  } catch (const Error& e) {
    spdlog::error("study: {}", e.what());
    return 1;
  }
}

}  // namespace vmsync
