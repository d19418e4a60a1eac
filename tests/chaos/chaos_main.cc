// `make chaos`: the seeded schedule of switches and faults, one run per seed,
// and the summary table. Exit status 1 when any checker failed.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>

#include "base/error.h"
#include "chaos.h"
#include "transport/rpc_util.h"

int main(int argc, char** argv) {
  CLI::App app{"vmsync chaos: seeded switches, link cuts and kills against a real cluster, with checkers"};
  std::vector<std::uint64_t> seeds{1};
  int steps = 50;
  std::string out = "chaos";
  app.add_option("--seeds", seeds, "seeds to run, one run each (a seed fixes the schedule)")->delimiter(',');
  app.add_option("--steps", steps, "steps per seed")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--out", out, "directory for each run's cluster, logs and events.log (kept)")->capture_default_str();
  std::string checkDir;
  app.add_option("--check", checkDir,
                 "only run the durability checker on a run's directory (e.g. build/chaos/seed-1) and exit");
  int deadLinkSeconds = vmsync::testing::kChaosDeadLinkSeconds;
  app.add_option("--dead-link-timeout", deadLinkSeconds,
                 "seconds of silence after which the server, the devices and the relays give a connection up")
      ->check(CLI::Range(vmsync::kMinDeadLinkSeconds, 60))
      ->capture_default_str();
  bool print = false;
  app.add_flag("--print-schedule", print, "print each seed's steps and exit");
  CLI11_PARSE(app, argc, argv);

  if (print) {
    for (std::uint64_t seed : seeds) {
      std::printf("seed %llu:\n", static_cast<unsigned long long>(seed));
      for (const auto& line : vmsync::testing::describeSchedule(seed, steps, deadLinkSeconds)) std::printf("  %s\n", line.c_str());
    }
    return 0;
  }

  if (!checkDir.empty()) {
    const auto r = vmsync::testing::checkAcknowledged(checkDir);
    std::printf("%llu acknowledged: %llu found by digest, %llu folded into the base, %llu abandoned, %llu lost\n",
                static_cast<unsigned long long>(r.acknowledged), static_cast<unsigned long long>(r.checkedByDigest),
                static_cast<unsigned long long>(r.folded), static_cast<unsigned long long>(r.abandoned),
                static_cast<unsigned long long>(r.lost));
    for (const auto& f : r.failures) std::printf("%s\n", f.c_str());
    return r.passed() && r.acknowledged > 0 ? 0 : 1;
  }

  const std::string missing = vmsync::testing::missingForChaos();
  if (!missing.empty()) {
    std::fprintf(stderr, "vmsync-chaos: cannot run here: %s\n", missing.c_str());
    return 2;
  }
  std::vector<vmsync::testing::ChaosResult> results;
  for (std::uint64_t seed : seeds) {
    vmsync::testing::ChaosOptions options;
    options.seed = seed;
    options.steps = steps;
    options.deadLinkSeconds = deadLinkSeconds;
    options.dir = std::filesystem::absolute(out).string() + "/seed-" + std::to_string(seed);
    std::filesystem::remove_all(options.dir);
    std::filesystem::create_directories(options.dir);
    options.progress = &std::cout;
    try {
      results.push_back(vmsync::testing::runChaos(options));
    } catch (const vmsync::Error& e) {
      std::fprintf(stderr, "vmsync-chaos: seed %llu: the cluster could not start: %s\n",
                   static_cast<unsigned long long>(seed), e.what());
      return 2;
    }
    for (const auto& f : results.back().failures) std::printf("seed %llu: %s\n", static_cast<unsigned long long>(seed), f.c_str());
  }
  std::fputs(vmsync::testing::summaryTable(results).c_str(), stdout);
  for (const auto& r : results)
    if (!r.passed()) return 1;
  return 0;
}
