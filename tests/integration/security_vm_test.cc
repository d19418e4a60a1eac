// Bad input never crashes or corrupts, and a revoked device loses the VM:
// malformed checkpoints pushed at a real server process with TLS, alone and
// during a real handoff, and an active device whose credential is revoked.
#include <gtest/gtest.h>

#include <lz4.h>

#include <atomic>
#include <cstring>
#include <regex>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <thread>

#include <kj/async-io.h>
#include <kj/compat/tls.h>
#include <nlohmann/json.hpp>

#include "base/units.h"
#include "security_support.h"

namespace vmsync::testing {
namespace {

namespace fs = std::filesystem;

/// A full checkpoint of a kUnits-unit VM whose units are all 0x5a.
void validFull(wire::Checkpoint::Builder c, std::uint64_t epoch) {
  c.setVmId("vm");
  c.setEpoch(epoch);
  c.setSequence(1);
  c.setBaseSequence(0);
  c.setKind(wire::CheckpointKind::FULL);
  c.setOrigin("phone");
  auto spec = c.initSpec();
  spec.setVmId("vm");
  spec.setMemoryBytes(kUnits * kUnitSize);
  spec.setDiskBytes(kUnits * kUnitSize);
  std::vector<kj::byte> page(kUnitSize, 0x5a);
  auto memory = c.initMemory(kUnits);
  for (unsigned i = 0; i < kUnits; ++i) {
    memory[i].setIndex(i);
    memory[i].setEncoding(wire::ChunkEncoding::WHOLE);
    memory[i].setData(kj::arrayPtr(page.data(), page.size()));
  }
}

/// An incremental checkpoint on top of `head` with one chunk `chunk` fills.
std::function<void(wire::Checkpoint::Builder)> incremental(std::uint64_t epoch, std::uint64_t head,
                                                           std::function<void(capnp::List<wire::Chunk>::Builder)> fill,
                                                           unsigned chunks = 1) {
  return [=](wire::Checkpoint::Builder c) {
    c.setVmId("vm");
    c.setEpoch(epoch);
    c.setSequence(head + 1);
    c.setBaseSequence(head);
    c.setKind(wire::CheckpointKind::INCREMENTAL);
    c.setOrigin("phone");
    fill(c.initMemory(chunks));
  };
}

struct BadCase {
  const char* what;
  const char* expected;  // in the error
  std::function<void(capnp::List<wire::Chunk>::Builder)> fill;
  unsigned chunks = 1;
};

std::vector<BadCase> badCases() {
  auto whole = [](wire::Chunk::Builder chunk, std::uint64_t index, std::size_t bytes) {
    std::vector<kj::byte> data(bytes, 0x33);
    chunk.setIndex(index);
    chunk.setEncoding(wire::ChunkEncoding::WHOLE);
    chunk.setData(kj::arrayPtr(data.data(), data.size()));
  };
  return {
      {"out of range", "names unit 16, but the image has 16 units",
       [=](auto l) { whole(l[0], kUnits, kUnitSize); }},
      {"truncated page", "whole unit has 100 bytes", [=](auto l) { whole(l[0], 3, 100); }},
      {"oversized page", "whole unit has 8192 bytes",
       [=](auto l) { whole(l[0], 3, 2 * kUnitSize); }},
      {"too many chunks", "list has 17 chunks",
       [=](auto l) {
         for (unsigned i = 0; i < 17; ++i) whole(l[i], i % kUnits, kUnitSize);
       },
       17},
      {"same unit twice", "names unit 2 a second time",
       [=](auto l) {
         whole(l[0], 2, kUnitSize);
         whole(l[1], 2, kUnitSize);
       },
       2},
      {"forward reference", "does not come before it",
       [=](auto l) {
         l[0].setIndex(1);
         l[0].setEncoding(wire::ChunkEncoding::SAME_AS);
         l[0].setSameAs(1);
         whole(l[1], 2, kUnitSize);
       },
       2},
      {"garbled lz4", "lz4 data is corrupt",
       [](auto l) {
         std::vector<kj::byte> junk(300);
         for (std::size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<kj::byte>(i * 131 + 7);
         l[0].setIndex(4);
         l[0].setEncoding(wire::ChunkEncoding::WHOLE);
         l[0].setCompression(wire::Compression::LZ4);
         l[0].setRawSize(kUnitSize);
         l[0].setData(kj::arrayPtr(junk.data(), junk.size()));
       }},
      {"lz4 raw size oversized", "raw size 1048576 out of range",
       [](auto l) {
         std::vector<kj::byte> page(kUnitSize, 1), packed(LZ4_compressBound(kUnitSize));
         int n = LZ4_compress_default(reinterpret_cast<const char*>(page.data()),
                                      reinterpret_cast<char*>(packed.data()), kUnitSize,
                                      static_cast<int>(packed.size()));
         l[0].setIndex(5);
         l[0].setEncoding(wire::ChunkEncoding::WHOLE);
         l[0].setCompression(wire::Compression::LZ4);
         l[0].setRawSize(1 << 20);
         l[0].setData(kj::arrayPtr(packed.data(), static_cast<std::size_t>(n)));
       }},
      {"blob not there", "chunk 8: names blob 3, but the checkpoint has 0",
       [](auto l) {
         l[0].setIndex(8);
         l[0].setEncoding(wire::ChunkEncoding::WHOLE);
         l[0].setBlob(3);
         l[0].setBlobSize(kUnitSize);
       }},
      {"payload in two places", "carries 4096 bytes of its own and names blob 1 too",
       [=](auto l) {
         whole(l[0], 9, kUnitSize);
         l[0].setBlob(1);
       }},
      {"garbled xor-diff", "chunk 6",
       [](auto l) {
         std::vector<kj::byte> junk = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x80, 0x80, 0x01, 1, 2, 3};
         l[0].setIndex(6);
         l[0].setEncoding(wire::ChunkEncoding::XOR_DIFF);
         l[0].setData(kj::arrayPtr(junk.data(), junk.size()));
       }},
  };
}

TEST(Security, MalformedCheckpointsAreRejectedWholeAndTheServerGoesOn) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  auto io = kj::setupAsyncIo();
  Client phone(io, cluster, cluster.credential("phone"));
  ASSERT_EQ(phone.registerAs("phone"), "");
  const std::uint64_t epoch = phone.lease();
  ASSERT_EQ(phone.push([&](auto c) { validFull(c, epoch); }), "");
  std::uint64_t head = 1;
  for (const BadCase& bad : badCases()) {
    SCOPED_TRACE(bad.what);
    const std::string error = phone.push(incremental(epoch, head, bad.fill, bad.chunks));
    std::printf("%-24s -> %s\n", bad.what, error.c_str());
    EXPECT_NE(error.find(bad.expected), std::string::npos) << error;
    EXPECT_NE(error.find("rejected"), std::string::npos) << error;
    EXPECT_EQ((*cluster.status())["head_sequence"], head) << "a rejected checkpoint was stored";
  }
  // The server is intact and goes on: a good checkpoint after all that is stored.
  EXPECT_EQ(phone.push(incremental(epoch, head, [](auto l) {
              l[0].setIndex(7);
              l[0].setEncoding(wire::ChunkEncoding::ZERO);
            })),
            "");
  EXPECT_EQ((*cluster.status())["head_sequence"], head + 1);
  EXPECT_EQ(readFile(dir.path() + "/server.log").find("damaged"), std::string::npos);
}

class SecurityWithVm : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing = missingForVm();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

TEST_F(SecurityWithVm, HostilePushesDoNotDisturbAHandoff) {
  TempDir dir;
  Cluster cluster(dir.path());
  cluster.startServer();
  cluster.startActive("A");
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, std::chrono::seconds(180))) << cluster.logOf("A") << cluster.logOf("B");

  // One of the owner's devices turned hostile: it floods the server with
  // malformed checkpoints while the VM moves from A to B.
  auto io = kj::setupAsyncIo();
  Client hostile(io, cluster, cluster.credential("M"));
  ASSERT_EQ(hostile.registerAs("M"), "");
  std::atomic<bool> switched{false};
  int rc = -1;
  nlohmann::json report;
  std::string output;
  std::thread mover([&] {
    rc = cluster.switchTo("B", &report, &output);
    switched = true;
  });
  std::size_t rejected = 0;
  std::uint64_t sequence = cluster.head();
  const auto cases = badCases();
  while (!switched) {
    for (const BadCase& bad : cases) {
      std::string error = hostile.push(incremental(1, sequence, bad.fill, bad.chunks));
      EXPECT_FALSE(error.empty()) << "a malformed checkpoint (" << bad.what << ") was stored";
      rejected += !error.empty();
    }
  }
  mover.join();
  std::printf("%zu malformed checkpoints rejected during the switch\n", rejected);
  ASSERT_EQ(rc, 0) << output << cluster.logOf("A") << cluster.logOf("B") << cluster.logOf("server");
  EXPECT_EQ(report["to"], "B");  // B verified the final digest before resuming
  EXPECT_GT(rejected, 0u);
  // What the guest printed is the guest's, on both devices.
  for (const char* device : {"A", "B"}) {
    EXPECT_EQ(modeOf(cluster.stateDir(device)), 0700u) << device;
    EXPECT_EQ(modeOf(cluster.serialLog(device)), 0600u) << device;
  }
}

TEST_F(SecurityWithVm, ARevokedActiveDeviceIsFencedAndTheVmFailsOverAtOnce) {
  TempDir dir;
  Cluster cluster(dir.path());
  // A lease timeout far longer than the test: only the fence lets the forced
  // switch through.
  cluster.startServer({"--lease-timeout", "600"});
  cluster.startActive("A", {"--resumable-every", "2"});
  cluster.startStandby("B");
  ASSERT_TRUE(cluster.waitForHead(3, std::chrono::seconds(180))) << cluster.logOf("A") << cluster.logOf("B");
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("A"))).size() >= 3; },
                      std::chrono::seconds(180)))
      << cluster.logOf("A");
  const std::vector<long> beforeOnA = counterValues(readFile(cluster.serialLog("A")));
  // A resumable point made after those values: the VM B resumes has printed them.
  const std::uint64_t printedBy = cluster.head();
  ASSERT_TRUE(waitFor(
      [&] {
        auto s = cluster.status();
        return s && (*s)["resumable_point"].get<std::uint64_t>() > printedBy;
      },
      std::chrono::seconds(60)))
      << cluster.logOf("A");

  std::string out;
  ASSERT_EQ(revoke(cluster, {"--user", "owner", "--device", "A", "--reason", "stolen"}, &out), 0) << out;
  ASSERT_TRUE(waitFor([&] { return cluster.deviceStatus("A")["state"] == "offline"; }, std::chrono::seconds(30)))
      << "the server still sees A online" << cluster.logOf("server");
  // A cannot come back: its reconnections are refused, saying why.
  ASSERT_TRUE(waitFor([&] { return readFile(dir / "A.log").find("may not connect") != std::string::npos; },
                      std::chrono::seconds(30)))
      << cluster.logOf("A");
  cluster.stopDevice("A");  // the thief's copy is out of reach; here it stops so that B has the CPU
  auto status = cluster.status();
  ASSERT_TRUE(status);
  const std::uint64_t point = (*status)["resumable_point"];
  ASSERT_GT(point, 0u) << status->dump(2);

  std::string forced;
  ASSERT_EQ(run({vmsyncBinary(), "switch", "--to", "B", "--force", "--json", "--server", cluster.address(),
                 "--credential", cluster.credential("cli")},
                &forced),
            0)
      << forced << cluster.logOf("server");
  const auto report = nlohmann::json::parse(forced.substr(forced.find('{')));
  EXPECT_EQ(report["forced"], true) << forced;
  EXPECT_EQ(report["from"], "A") << forced;
  EXPECT_EQ(report["final_sequence"], point) << forced;
  ASSERT_TRUE(waitFor([&] { return counterValues(readFile(cluster.serialLog("B"))).size() >= 3; },
                      std::chrono::seconds(120)))
      << cluster.logOf("B");
  const std::vector<long> onB = counterValues(readFile(cluster.serialLog("B")));
  std::string why;
  EXPECT_TRUE(consecutive(onB, &why)) << why;
  EXPECT_GE(onB.front() - 1, beforeOnA.back())
      << "B went back before what A printed:\n" << readFile(cluster.serialLog("A")) << "---- B ----\n"
      << readFile(cluster.serialLog("B")) << cluster.logOf("B");

  const auto lines = auditOf(dir.path() + "/server");
  EXPECT_EQ(audited(lines, "revoke", "done", "owner", "A", "stolen"), 1u);
  EXPECT_EQ(audited(lines, "fence", "done", "owner", "A", "revoked"), 1u);
  EXPECT_GE(audited(lines, "connect", "refused", "owner", "A", "was revoked"), 1u);
}

}  // namespace
}  // namespace vmsync::testing
