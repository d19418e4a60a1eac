// The chaos harness in `make test`: a short seeded schedule (VMSYNC_CHAOS_SEED,
// default 1; VMSYNC_CHAOS_STEPS, default 30), the schedules of the regression
// list (regression-seeds.txt: each failure the harness found, fixed since),
// and proof that the durability checker sees a lost checkpoint.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "chaos.h"
#include "test_env.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

int envOr(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && std::atoi(v) > 0 ? std::atoi(v) : fallback;
}

/// Runs `steps` steps of `seed` in `dir` and checks the result proved something.
ChaosResult runAndCheck(const TempDir& dir, std::uint64_t seed, int steps) {
  ChaosOptions options;
  options.seed = seed;
  options.steps = steps;
  options.dir = dir.path();
  options.progress = &std::cout;
  const ChaosResult result = runChaos(options);
  std::cout << summaryTable({result});
  for (const auto& f : result.failures) ADD_FAILURE() << f;
  // The run proved something: checkpoints were acknowledged and found,
  // switches happened, the counter was read.
  EXPECT_GT(result.checkedByDigest, 0u);
  EXPECT_GT(result.switchesSucceeded, 0);
  EXPECT_GT(result.counterValues, 100u);
  EXPECT_EQ(result.lost, 0u);
  EXPECT_EQ(result.twoRunning, 0);
  return result;
}

TEST(Chaos, AShortScheduleLosesNothingAndNeverRunsTwoVms) {
  const std::string missing = missingForChaos();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  TempDir dir;
  const ChaosResult result =
      runAndCheck(dir, static_cast<std::uint64_t>(envOr("VMSYNC_CHAOS_SEED", 1)), envOr("VMSYNC_CHAOS_STEPS", 16));
  ASSERT_TRUE(result.passed());

  // The durability checker fails when an acknowledged checkpoint goes: take
  // away the newest stored one and look again.
  std::string newest;
  for (const auto& e : fs::directory_iterator(dir / "server/vms/owner/vm/checkpoints"))
    if (e.path().extension() == ".ckpt" && e.path().string() > newest) newest = e.path().string();
  ASSERT_FALSE(newest.empty());
  fs::remove(newest);
  const ChaosResult after = checkAcknowledged(dir.path());
  EXPECT_EQ(after.lost, 1u) << "removed " << newest;
  ASSERT_FALSE(after.failures.empty());
  EXPECT_NE(after.failures.front().find("not in the store"), std::string::npos) << after.failures.front();
}

struct Regression {
  std::uint64_t seed;
  int steps;
  std::string found;
};

void PrintTo(const Regression& r, std::ostream* os) { *os << "seed " << r.seed << ", " << r.steps << " steps"; }

/// The regression list: "SEED STEPS what it found" per line, # for comments.
std::vector<Regression> regressions() {
  std::vector<Regression> out;
  std::ifstream in(VMSYNC_CHAOS_REGRESSIONS);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    Regression r;
    if (!(fields >> r.seed >> r.steps)) throw std::runtime_error("regression-seeds.txt: bad line: " + line);
    std::getline(fields >> std::ws, r.found);
    out.push_back(r);
  }
  return out;
}

class ChaosRegression : public ::testing::TestWithParam<Regression> {};

TEST_P(ChaosRegression, ReplaysAndPasses) {
  const std::string missing = missingForChaos();
  if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  TempDir dir;
  std::cout << "replaying seed " << GetParam().seed << " (" << GetParam().steps << " steps), which found: "
            << GetParam().found << "\n";
  EXPECT_TRUE(runAndCheck(dir, GetParam().seed, GetParam().steps).passed());
}

GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(ChaosRegression);  // the list may be empty
INSTANTIATE_TEST_SUITE_P(Seeds, ChaosRegression, ::testing::ValuesIn(regressions()),
                         [](const ::testing::TestParamInfo<Regression>& info) {
                           return "seed" + std::to_string(info.param.seed);
                         });

}  // namespace
}  // namespace vmsync::testing
