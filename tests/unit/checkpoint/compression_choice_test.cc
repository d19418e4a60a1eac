// --compression: what it accepts, and the choice `auto` makes from the link
// rate and what each choice costs in CPU.
#include "checkpoint/compression_choice.h"

#include <gtest/gtest.h>

#include "base/error.h"

namespace vmsync {
namespace {

std::string parsed(const char* text) {
  try {
    return parseCompressionSetting(text).name();
  } catch (const Error& e) {
    return std::string("error: ") + e.what();
  }
}

TEST(CompressionSetting, ParsesEveryChoiceAndNamesWhatIsWrong) {
  EXPECT_EQ(parsed("auto"), "auto");
  EXPECT_EQ(parsed("none"), "none");
  EXPECT_EQ(parsed("lz4"), "lz4");
  EXPECT_EQ(parsed("zstd"), "zstd:3");
  EXPECT_EQ(parsed("zstd:1"), "zstd:1");
  EXPECT_EQ(parsed("zstd:19"), "zstd:19");
  EXPECT_EQ(parsed("zstd:0"), "error: compression 'zstd:0': the zstd level must be a number from 1 to 22");
  EXPECT_EQ(parsed("zstd:23"), "error: compression 'zstd:23': the zstd level must be a number from 1 to 22");
  EXPECT_EQ(parsed("zstd:3x"), "error: compression 'zstd:3x': the zstd level must be a number from 1 to 22");
  EXPECT_EQ(parsed("zstd:"), "error: compression 'zstd:': the zstd level must be a number from 1 to 22");
  EXPECT_EQ(parsed("gzip"), "error: unknown compression 'gzip': use auto, none, lz4, zstd or zstd:LEVEL");
}

/// The choice after pushes at `bytesPerSecond`.
PayloadCompression choiceAt(double bytesPerSecond, CompressionSelector selector = CompressionSelector()) {
  for (int i = 0; i < 20; ++i)
    selector.onPush(static_cast<std::uint64_t>(bytesPerSecond), 1.0);
  return selector.choice();
}

TEST(CompressionSelector, Lz4BeforeTheLinkIsKnownAndOnFastLinksZstdHigherTheSlowerTheLink) {
  EXPECT_EQ(CompressionSelector().choice().name(), "lz4");
  EXPECT_EQ(choiceAt(1e9).name(), "lz4");     // 8 Gbit/s: no zstd level keeps up
  EXPECT_EQ(choiceAt(125e6).name(), "lz4");   // 1 Gbit/s
  // Slower links, stronger levels, never a weaker one for a slower link.
  int previous = 0;
  for (double rate : {30e6, 10e6, 2.5e6, 1e6, 125e3, 20e3}) {
    const PayloadCompression c = choiceAt(rate);
    const int level = c.kind == wire::Compression::ZSTD ? c.level : 0;
    EXPECT_GE(level, previous) << rate << " B/s: " << c.name();
    previous = level;
  }
  EXPECT_EQ(choiceAt(125e3).name(), "zstd:19");  // 1 Mbit/s, a poor cellular uplink
  EXPECT_EQ(choiceAt(2.5e6).name(), "zstd:9");   // 20 Mbit/s
  EXPECT_EQ(choiceAt(10e6).name(), "zstd:3");    // 80 Mbit/s
}

// The CPU a choice really costs moves the choice: a CPU ten times slower
// than the figures the selector starts from affords only weaker levels on
// the same link, and a guest whose pages compress less makes zstd's CPU
// per wire byte dearer too.
TEST(CompressionSelector, MeasuredCpuCostMovesTheChoice) {
  const double link = 2.5e6;
  ASSERT_EQ(choiceAt(link).name(), "zstd:9");
  CompressionSelector slowCpu;
  // zstd:9 measured: 32 MiB of units in 8 s of CPU (4 MB/s), to 0.28 of their size.
  slowCpu.onEncoded({wire::Compression::ZSTD, 9}, 32u << 20, static_cast<std::uint64_t>((32u << 20) * 0.28), 8.0);
  EXPECT_NEAR(slowCpu.speed({wire::Compression::ZSTD, 9}), (32u << 20) / 8.0, 1);
  // The unmeasured levels are scaled by the same factor.
  EXPECT_LT(slowCpu.speed({wire::Compression::ZSTD, 3}), 150e6 / 5);
  const PayloadCompression slower = choiceAt(link, slowCpu);
  EXPECT_TRUE(slower.kind == wire::Compression::LZ4 || (slower.kind == wire::Compression::ZSTD && slower.level < 9))
      << slower.name();
  // Too few bytes to tell anything: ignored.
  CompressionSelector tiny;
  tiny.onEncoded({wire::Compression::ZSTD, 9}, 4096, 1000, 1.0);
  EXPECT_EQ(choiceAt(link, tiny).name(), "zstd:9");
  // The explanation names the link and every candidate.
  CompressionSelector explained;
  explained.onPush(1'000'000, 1.0);
  const std::string why = explained.explain();
  EXPECT_NE(why.find("link 8.00 Mbit/s"), std::string::npos) << why;
  for (const char* name : {"lz4", "zstd:1", "zstd:3", "zstd:9", "zstd:19"})
    EXPECT_NE(why.find(name), std::string::npos) << why;
}

TEST(CompressionSelector, ForcedCandidatesAlwaysKeepLz4AsTheFloor) {
  CompressionSelector only({{wire::Compression::ZSTD, 5}});
  EXPECT_EQ(choiceAt(1e9, only).name(), "lz4");
  EXPECT_EQ(choiceAt(50e3, only).name(), "zstd:5");
}

}  // namespace
}  // namespace vmsync
