// vmsync_bench_summary: reads the JSON that vmsync_bench wrote
// (--benchmark_out=FILE --benchmark_out_format=json) and prints the pipeline's
// speed targets next to what that run measured, each with its baseline from
// the same run, then the benchmarks issue 8 names that have no target. With
// --xfs, a report of BM_ApplyCheckpointWrites run on XFS adds the standby's
// image writes there; with --fanout, a report of vmsync_fanout_bench adds the
// server's fan-out. It judges nothing by its exit status: 0 when every figure
// it prints is in the files, 1 when one is missing (a benchmark renamed or
// filtered out), 2 on bad arguments or an unreadable file.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Run {
  double cpuMs = 0;           // CPU time per iteration, in ms
  double realMs = 0;          // wall time per iteration, in ms
  double bytesPerSecond = 0;  // 0 when the benchmark does not count bytes
  std::string label;
};

double toMs(double value, const std::string& unit) {
  if (unit == "ns") return value / 1e6;
  if (unit == "us") return value / 1e3;
  if (unit == "s") return value * 1e3;
  return value;  // ms
}

class Results {
 public:
  explicit Results(const nlohmann::json& report) {
    for (const auto& b : report.at("benchmarks")) {
      // With repetitions the median stands for the benchmark, else its first run.
      const bool aggregate = b.value("run_type", "iteration") == "aggregate";
      if (aggregate && b.value("aggregate_name", "") != "median") continue;
      const std::string name = b.value("run_name", b.value("name", ""));
      if (!aggregate && runs_.count(name)) continue;
      const std::string unit = b.value("time_unit", "ns");
      runs_[name] = Run{toMs(b.value("cpu_time", 0.0), unit), toMs(b.value("real_time", 0.0), unit),
                        b.value("bytes_per_second", 0.0), b.value("label", "")};
    }
  }

  /// The run whose name starts with `prefix` (benchmark names carry their
  /// arguments and options after it), or nothing; notes the missing name.
  std::optional<Run> find(const std::string& prefix) {
    for (const auto& [name, run] : runs_)
      if (name.rfind(prefix, 0) == 0) return run;
    missing_.push_back(prefix);
    return std::nullopt;
  }
  const std::vector<std::string>& missing() const { return missing_; }

 private:
  std::map<std::string, Run> runs_;
  std::vector<std::string> missing_;
};

void row(const std::string& target, const std::string& measured, const char* verdict) {
  std::printf("%-72s | %-30s | %s\n", target.c_str(), measured.c_str(), verdict);
}
void row(const std::string& target, const std::string& measured, bool met) {
  row(target, measured, met ? "met" : "NOT met");
}

std::string format(const char* pattern, double a, double b = 0, double c = 0) {
  char text[128];
  std::snprintf(text, sizeof(text), pattern, a, b, c);
  return text;
}

/// The Dirty and Diff runs of `benchmark` at `percent` % changed with `scan`,
/// or nothing when one is missing.
std::optional<std::pair<Run, Run>> checkpointRuns(Results& results, const std::string& benchmark,
                                                  int percent, int scan) {
  auto dirty = results.find(benchmark + format("/pct:%.0f/diff:0/scan:%.0f", percent, scan));
  auto diff = results.find(benchmark + format("/pct:%.0f/diff:1/scan:%.0f", percent, scan));
  if (!dirty || !diff) return std::nullopt;
  return std::pair{*dirty, *diff};
}

/// The row of the 30 ms CPU target for one way of building the 5 % checkpoint
/// (`benchmark` with `scan`), Dirty and Diff; none when a run is missing.
void checkpointRow(Results& results, const std::string& target, const std::string& benchmark, int scan) {
  auto runs = checkpointRuns(results, benchmark, 5, scan);
  if (!runs) return;
  const auto& [dirty, diff] = *runs;
  row(target, format("%.1f / %.1f ms CPU", dirty.cpuMs, diff.cpuMs),
      dirty.cpuMs <= 30 && diff.cpuMs <= 30);
}

/// The row of the standby's image writes, pwrite against io_uring, from one
/// report of BM_ApplyCheckpointWrites; none when a run is missing.
void imageWritesRow(Results& results, const std::string& target) {
  auto pwrite = results.find("BM_ApplyCheckpointWrites/ring:0");
  auto ring = results.find("BM_ApplyCheckpointWrites/ring:1");
  if (!pwrite || !ring) return;
  // The label: the file system, and what an image left to choose writes with.
  row(target + " (" + pwrite->label + ")",
      format("%.2f / %.2f GB/s", pwrite->bytesPerSecond / 1e9, ring->bytesPerSecond / 1e9),
      "for comparison");
}

/// The JSON report at `path`; exits with status 2 if it cannot be read.
nlohmann::json readReport(const char* path) {
  try {
    std::ifstream in(path);
    if (!in) {
      std::fprintf(stderr, "cannot open %s\n", path);
      std::exit(2);
    }
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s is not a Google Benchmark JSON report: %s\n", path, e.what());
    std::exit(2);
  }
}

/// The rows of the benchmarks issue 8 asks for that have no target.
void comparisonRows(Results& results) {
  auto lz4 = results.find("BM_Lz4WholeUnit");
  auto unlz4 = results.find("BM_Lz4DecodeWholeUnit");
  if (lz4 && unlz4)
    row("lz4, one core: compress guest-like units / decompress 2.5:1 ones",
        format("%.2f / %.2f GB/s", lz4->bytesPerSecond / 1e9, unlz4->bytesPerSecond / 1e9),
        "for comparison");
  if (auto decode = results.find("BM_XorDiffDecode"))
    row("XOR-diff decode, 10 % of bytes changed, one core",
        format("%.2f GB/s", decode->bytesPerSecond / 1e9), "for comparison");
  auto one = checkpointRuns(results, "BM_BuildCheckpoint512MiB", 1, 1);
  auto twenty = checkpointRuns(results, "BM_BuildCheckpoint512MiB", 20, 1);
  if (one && twenty)
    row("512 MiB checkpoint by scan, 1 % and 20 % changed (Dirty / Diff)",
        format("%.1f / %.1f, ", one->first.cpuMs, one->second.cpuMs) +
            format("%.1f / %.1f ms CPU", twenty->first.cpuMs, twenty->second.cpuMs),
        "for comparison");
}

/// The fan-out rows, from a report of vmsync_fanout_bench.
void fanOutRows(Results& results) {
  auto small = results.find("BM_ServerFanOutTo8Standbys/256");
  auto large = results.find("BM_ServerFanOutTo8Standbys/2048");
  if (small && large)
    row("server fan-out of one checkpoint to 8 standbys, 256 / 2048 pages",
        format("%.1f / %.1f ms (%.2f GB/s)", small->realMs, large->realMs,
               large->bytesPerSecond / 1e9),
        "for comparison");
}

/// Notes what `results` (read from `path`) lacks; false if anything.
bool complete(const Results& results, const char* path) {
  for (const auto& name : results.missing())
    std::fprintf(stderr, "%s: no result for %s; the summary is incomplete\n", path, name.c_str());
  return results.missing().empty();
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage =
      "usage: %s VMSYNC_BENCH_JSON [--xfs IMAGE_WRITES_ON_XFS_JSON] [--fanout FANOUT_JSON]\n";
  if (argc < 2 || argc % 2 != 0) {
    std::fprintf(stderr, usage, argv[0]);
    return 2;
  }
  const char* xfsPath = nullptr;
  const char* fanOutPath = nullptr;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--xfs") {
      xfsPath = argv[i + 1];
    } else if (flag == "--fanout") {
      fanOutPath = argv[i + 1];
    } else {
      std::fprintf(stderr, usage, argv[0]);
      return 2;
    }
  }
  const nlohmann::json report = readReport(argv[1]);
  Results results(report);
  const auto& context = report.value("context", nlohmann::json::object());
  std::printf("pipeline targets (issue 8), measured in one run: %d CPUs at %.0f MHz, load %s\n",
              context.value("num_cpus", 0), context.value("mhz_per_cpu", 0.0),
              context.contains("load_avg") ? context["load_avg"].dump().c_str() : "unknown");
  std::printf("%-72s | %-30s |\n", "target", "measured in this run");

  auto read = results.find("BM_ReadBaseline");
  auto scan = results.find("BM_ScanHashPerUnit/avx2:1");
  if (read && scan && read->bytesPerSecond > 0) {
    const double share = scan->bytesPerSecond / read->bytesPerSecond;
    row("scan >= 75 % of the one-pass read baseline, one core",
        format("%.0f %% (%.1f of %.1f GB/s)", share * 100, scan->bytesPerSecond / 1e9,
               read->bytesPerSecond / 1e9),
        share >= 0.75);
  }
  if (auto xorDiff = results.find("BM_XorDiffEncode/pct:10/avx2:1"))
    row("XOR-diff encode >= 2 GB/s per core, 10 % of bytes changed",
        format("%.2f GB/s", xorDiff->bytesPerSecond / 1e9), xorDiff->bytesPerSecond >= 2e9);
  checkpointRow(results, "512 MiB checkpoint, 5 % changed, <= 30 ms CPU (dirty list; Dirty / Diff)",
                "BM_BuildCheckpoint512MiB", 0);
  checkpointRow(results, "  the same up to the Cap'n Proto message", "BM_BuildCheckpointMessage512MiB", 0);
  if (read && read->bytesPerSecond > 0) {
    // Reading 512 MiB once at the baseline's speed: the floor of any scan.
    const double floorMs = 512.0 * (1 << 20) / read->bytesPerSecond * 1e3;
    checkpointRow(results, format("  the same by scan (reading 512 MiB alone takes %.0f ms here)", floorMs),
                  "BM_BuildCheckpoint512MiB", 1);
  }
  if (auto apply = results.find("BM_ApplyCheckpoint/cache:0"))
    row("standby apply >= 1 GB/s of checkpoint payload, per CPU second",
        format("%.2f GB/s", apply->bytesPerSecond / 1e9), apply->bytesPerSecond >= 1e9);
  if (auto unsettled = results.find("BM_ApplyCheckpoint/cache:1"))
    row("  the same into the large folios a sequential read leaves (not recached)",
        format("%.2f GB/s", unsettled->bytesPerSecond / 1e9), "for comparison");
  imageWritesRow(results, "  its image writes, pwrite / io_uring");
  std::optional<Results> xfs;
  if (xfsPath != nullptr) {
    xfs.emplace(readReport(xfsPath));
    imageWritesRow(*xfs, "  the same on XFS");
  }
  comparisonRows(results);
  std::optional<Results> fanOut;
  if (fanOutPath != nullptr) {
    fanOut.emplace(readReport(fanOutPath));
    fanOutRows(*fanOut);
  }

  bool whole = complete(results, argv[1]);
  if (xfs) whole = complete(*xfs, xfsPath) && whole;
  if (fanOut) whole = complete(*fanOut, fanOutPath) && whole;
  return whole ? 0 : 1;
}
