// The harvest -> diff -> compress -> apply pipeline, measured next to the
// machine's own limits in the same run (memcmp / xxh3 over the same buffer).
#include <benchmark/benchmark.h>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <linux/magic.h>
#include <spdlog/spdlog.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <map>
#include <random>
#include <stdexcept>
#include <vector>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/checkpoint_record.h"
#include "checkpoint/chunk_codec.h"
#include "vmm/image_file.h"
#include "harvest/unit_hashes.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;

// Each image says at info level how it writes; the tables need no such lines.
const bool kQuiet = [] {
  spdlog::set_level(spdlog::level::warn);
  return true;
}();

/// A guest-like buffer: compressible text-ish pages, some zero pages.
std::vector<std::byte> makeImage(std::size_t bytes, std::uint32_t seed) {
  std::vector<std::byte> image(bytes);
  std::mt19937 rng(seed);
  for (std::size_t page = 0; page < bytes / kUnitSize; ++page) {
    if (page % 4 == 3) continue;  // a quarter of the pages stay zero
    for (std::size_t i = 0; i < kUnitSize; ++i)
      image[page * kUnitSize + i] = static_cast<std::byte>((rng() % 16) + 'a');
  }
  return image;
}

constexpr std::size_t kBufferBytes = 256u << 20;

void BM_MemcmpBaseline(benchmark::State& state) {
  auto a = makeImage(kBufferBytes, 1);
  auto b = a;
  for (auto _ : state) benchmark::DoNotOptimize(std::memcmp(a.data(), b.data(), a.size()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * a.size()));
}
BENCHMARK(BM_MemcmpBaseline)->Unit(benchmark::kMillisecond);

/// One pass reading the buffer (a sum of its words): the single-core memory-read
/// speed that a scan, reading each byte once, can at best reach.
void BM_ReadBaseline(benchmark::State& state) {
  auto a = makeImage(kBufferBytes, 1);
  for (auto _ : state) {
    std::uint64_t sums[4] = {};
    const std::size_t words = a.size() / 8;
    for (std::size_t i = 0; i + 4 <= words; i += 4)
      for (std::size_t k = 0; k < 4; ++k) {
        std::uint64_t word;
        std::memcpy(&word, a.data() + (i + k) * 8, 8);
        sums[k] += word;
      }
    benchmark::DoNotOptimize(sums[0] + sums[1] + sums[2] + sums[3]);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * a.size()));
}
BENCHMARK(BM_ReadBaseline)->Unit(benchmark::kMillisecond);

void BM_Xxh3Baseline(benchmark::State& state) {
  auto a = makeImage(kBufferBytes, 1);
  for (auto _ : state) benchmark::DoNotOptimize(XXH3_64bits(a.data(), a.size()));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * a.size()));
}
BENCHMARK(BM_Xxh3Baseline)->Unit(benchmark::kMillisecond);

/// The scan page source's cost: hash every 4 KiB unit of the image, one core;
/// avx2:1 is the build hashUnit() uses where the CPU has AVX2, avx2:0 the
/// library's.
void BM_ScanHashPerUnit(benchmark::State& state) {
  auto a = makeImage(kBufferBytes, 1);
  std::vector<std::uint64_t> hashes(a.size() / kUnitSize);
  auto hash = state.range(0) ? hashUnit : hashUnitPortable;
  for (auto _ : state) {
    for (std::size_t i = 0; i < hashes.size(); ++i) hashes[i] = hash({a.data() + i * kUnitSize, kUnitSize});
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * a.size()));
}
BENCHMARK(BM_ScanHashPerUnit)->Arg(0)->Arg(1)->ArgName("avx2")->Unit(benchmark::kMillisecond);

/// XOR-diff encode/decode on units with `percent` % of their bytes changed.
void BM_XorDiffEncode(benchmark::State& state) {
  const auto percent = static_cast<std::size_t>(state.range(0));
  const auto kernel = state.range(1) ? CompareKernel::kAvx2 : CompareKernel::kPortable;
  if (!compareKernelSupported(kernel)) {
    state.SkipWithError("this CPU has no AVX2");
    return;
  }
  auto ref = makeImage(64 * kUnitSize, 2);
  auto cur = ref;
  std::mt19937 rng(3);
  for (std::size_t i = 0; i < cur.size() * percent / 100; ++i) cur[rng() % cur.size()] ^= std::byte{0x5A};
  std::vector<std::byte> out;
  for (auto _ : state) {
    for (std::size_t u = 0; u < 64; ++u)
      benchmark::DoNotOptimize(encodeXorDiff({cur.data() + u * kUnitSize, kUnitSize},
                                             {ref.data() + u * kUnitSize, kUnitSize}, 2 * kUnitSize, out, kernel));
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * cur.size()));
}
BENCHMARK(BM_XorDiffEncode)->ArgsProduct({{1, 10, 50}, {0, 1}})->ArgNames({"pct", "avx2"});

/// changedBytes() (the study's measure) over the same units.
void BM_ChangedBytes(benchmark::State& state) {
  auto ref = makeImage(64 * kUnitSize, 2);
  auto cur = ref;
  std::mt19937 rng(3);
  for (std::size_t i = 0; i < cur.size() / 10; ++i) cur[rng() % cur.size()] ^= std::byte{0x5A};
  for (auto _ : state)
    for (std::size_t u = 0; u < 64; ++u)
      benchmark::DoNotOptimize(
          changedBytes({cur.data() + u * kUnitSize, kUnitSize}, {ref.data() + u * kUnitSize, kUnitSize}));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * cur.size()));
}
BENCHMARK(BM_ChangedBytes);

void BM_XorDiffDecode(benchmark::State& state) {
  auto ref = makeImage(64 * kUnitSize, 2);
  auto cur = ref;
  std::mt19937 rng(3);
  for (std::size_t i = 0; i < cur.size() / 10; ++i) cur[rng() % cur.size()] ^= std::byte{0x5A};
  std::vector<std::vector<std::byte>> diffs(64);
  for (std::size_t u = 0; u < 64; ++u)
    encodeXorDiff({cur.data() + u * kUnitSize, kUnitSize}, {ref.data() + u * kUnitSize, kUnitSize}, 2 * kUnitSize,
                  diffs[u]);
  std::vector<std::byte> out(kUnitSize);
  for (auto _ : state)
    for (std::size_t u = 0; u < 64; ++u) decodeXorDiff(diffs[u], {ref.data() + u * kUnitSize, kUnitSize}, out);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * cur.size()));
}
BENCHMARK(BM_XorDiffDecode);

void BM_Lz4WholeUnit(benchmark::State& state) {
  auto a = makeImage(64 * kUnitSize, 4);
  for (auto _ : state)
    for (std::size_t u = 0; u < 64; ++u)
      benchmark::DoNotOptimize(encodeWhole(u, {a.data() + u * kUnitSize, kUnitSize}, true));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * a.size()));
}
BENCHMARK(BM_Lz4WholeUnit);

/// The standby's side of lz4: 64 units that lz4 compresses (8-byte words
/// drawn from 32, so matches abound; makeImage's pages mostly do not
/// compress, and would measure a copy), decompressed.
void BM_Lz4DecodeWholeUnit(benchmark::State& state) {
  std::mt19937 rng(4);
  std::vector<std::uint64_t> words(32);
  for (auto& word : words) word = (std::uint64_t{rng()} << 32) | rng();
  std::vector<std::byte> a(64 * kUnitSize);
  for (std::size_t at = 0; at < a.size(); at += sizeof(std::uint64_t))
    std::memcpy(a.data() + at, &words[rng() % words.size()], sizeof(std::uint64_t));
  std::vector<EncodedUnit> units;
  std::size_t payload = 0;
  for (std::size_t u = 0; u < 64; ++u) {
    units.push_back(encodeWhole(u, {a.data() + u * kUnitSize, kUnitSize}, true));
    if (units.back().compression != wire::Compression::LZ4)
      throw std::runtime_error("a unit did not compress");
    payload += units.back().data.size();
  }
  std::vector<std::byte> out(kUnitSize);
  for (auto _ : state)
    for (const EncodedUnit& unit : units)
      decodeUnit(ChunkFields{unit.index, unit.encoding, unit.compression, unit.rawSize, unit.data},
                 {}, out);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * a.size()));
  state.counters["ratio"] = static_cast<double>(a.size()) / static_cast<double>(payload);
}
BENCHMARK(BM_Lz4DecodeWholeUnit);

/// Builds a checkpoint of a 512 MiB RAM image with `percent` % of pages changed,
/// and applies it on a standby image.
struct CheckpointFixture {
  fs::path dir;
  std::unique_ptr<ImageFile> source, receiver, disk;
  /// `readCache`: the receiver's page cache is what a sequential read of the
  /// file leaves (as after a copy, or a VMM's faults), not what a standby's
  /// own unit writes and reads leave.
  explicit CheckpointFixture(std::size_t bytes, bool readCache = false) {
    dir = makeDirectory();
    // Made once per size: generating 512 MiB byte by byte takes seconds.
    static std::map<std::size_t, std::vector<std::byte>> contents;
    auto made = contents.find(bytes);
    if (made == contents.end()) made = contents.emplace(bytes, makeImage(bytes, 5)).first;
    const std::vector<std::byte>& content = made->second;
    std::vector<UnitWrite> all(bytes / kUnitSize);
    for (std::size_t u = 0; u < all.size(); ++u) all[u] = {u, content.data() + u * kUnitSize};
    // Both as a standby writes a full checkpoint.
    for (const char* name : {"source", "receiver"}) {
      ImageFile image((dir / name).string(), true, bytes);
      image.writeUnits(all);
      image.sync();
    }
    if (readCache) readSequentially(dir / "receiver");
    source = std::make_unique<ImageFile>((dir / "source").string(), true);
    receiver = std::make_unique<ImageFile>((dir / "receiver").string(), true);
    disk = std::make_unique<ImageFile>((dir / "disk").string(), true, kUnitSize);
  }
  /// A new directory under VMSYNC_BENCH_DIR, or under /tmp.
  static fs::path makeDirectory() {
    const char* under = std::getenv("VMSYNC_BENCH_DIR");
    std::string path = std::string(under != nullptr ? under : "/tmp") + "/vmsync-bench-XXXXXX";
    if (::mkdtemp(path.data()) == nullptr)
      throw std::runtime_error("cannot make a directory like " + path + ": " +
                               std::strerror(errno));
    return path;
  }
  /// Drops `path` from the page cache and reads it back with a plain read.
  static void readSequentially(const fs::path& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) != 0)
      throw std::runtime_error("cannot drop " + path.string() + " from the page cache");
    std::vector<char> chunk(1u << 20);
    while (::read(fd, chunk.data(), chunk.size()) > 0) {
    }
    ::close(fd);
  }
  ~CheckpointFixture() { fs::remove_all(dir); }
  /// A tracker of the source as the receiver holds it now; under Diff Prev
  /// with its copy of the receiver's bytes.
  std::unique_ptr<ImageTracker> tracker(wire::Policy policy) const {
    return std::make_unique<ImageTracker>(
        *source, hashAllUnits(*source), policy, true,
        policy == wire::Policy::DIFF_PREV
            ? std::vector<std::byte>(source->bytes().begin(), source->bytes().end())
            : std::vector<std::byte>{});
  }
  /// Rewrites `percent` % of the source's units (64 random bytes each); returns
  /// their indexes, as a dirty-page source would report them.
  std::vector<std::uint64_t> change(std::size_t percent, std::uint32_t round) {
    std::mt19937 rng(round);
    std::vector<std::byte> unit(kUnitSize);
    std::vector<std::uint64_t> changed;
    const std::size_t units = source->units();
    for (std::size_t k = 0; k < units * percent / 100; ++k) {
      std::size_t u = rng() % units;
      changed.push_back(u);
      std::memcpy(unit.data(), source->unit(u).data(), kUnitSize);
      for (int b = 0; b < 64; ++b) unit[rng() % kUnitSize] = static_cast<std::byte>(rng());
      source->writeUnit(u, unit);
    }
    return changed;
  }
};

/// A checkpoint in `message` whose memory list holds `delta` and whose disk list is empty.
/// One 512 MiB fixture for every build benchmark: each makes its tracker
/// from the source as it finds it, so what earlier ones changed does not
/// matter, and writing two fresh 512 MiB images per benchmark is most of
/// the time a short run takes.
CheckpointFixture& buildFixture() {
  static CheckpointFixture f(512u << 20);
  return f;
}

wire::Checkpoint::Builder fillMemoryOnly(capnp::MallocMessageBuilder& message, const ImageDelta& delta) {
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  toWire(delta, ImageDelta{}, checkpoint);
  return checkpoint;
}

void BM_BuildCheckpoint512MiB(benchmark::State& state) {
  const auto percent = static_cast<std::size_t>(state.range(0));
  const auto policy = state.range(1) ? wire::Policy::DIFF_PREV : wire::Policy::DIRTY_PREV;
  // scan:1 hashes every unit (the scan page source); scan:0 only the units a
  // dirty-page source (kmod, kvm-ring) reports.
  const bool scan = state.range(2) != 0;
  CheckpointFixture& f = buildFixture();
  auto tracker = f.tracker(policy);
  std::uint32_t round = 0;
  std::uint64_t shipped = 0;
  for (auto _ : state) {
    state.PauseTiming();
    DirtyUnits candidates{.everything = scan};
    auto changed = f.change(percent, ++round);
    if (!scan) candidates.units = std::move(changed);
    state.ResumeTiming();
    ImageDelta delta = tracker->collect(candidates);
    shipped += delta.encodedBytes;
    tracker->acknowledge(delta);
  }
  state.counters["encoded_MiB"] = benchmark::Counter(static_cast<double>(shipped) / (1 << 20),
                                                      benchmark::Counter::kAvgIterations);
}
BENCHMARK(BM_BuildCheckpoint512MiB)
    ->ArgsProduct({{1, 5, 20}, {0, 1}, {1}})
    ->Args({5, 0, 0})
    ->Args({5, 1, 0})
    ->ArgNames({"pct", "diff", "scan"})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->Iterations(5);

/// The same, up to the Cap'n Proto message the active device sends: the
/// chunks' payloads end in the message, where the encoder's cost is measured.
void BM_BuildCheckpointMessage512MiB(benchmark::State& state) {
  const auto percent = static_cast<std::size_t>(state.range(0));
  const auto policy = state.range(1) ? wire::Policy::DIFF_PREV : wire::Policy::DIRTY_PREV;
  const bool scan = state.range(2) != 0;  // as in BM_BuildCheckpoint512MiB
  CheckpointFixture& f = buildFixture();
  auto tracker = f.tracker(policy);
  std::uint32_t round = 0;
  std::uint64_t words = 0;
  for (auto _ : state) {
    state.PauseTiming();
    DirtyUnits candidates{.everything = scan};
    auto changed = f.change(percent, ++round);
    if (!scan) candidates.units = std::move(changed);
    state.ResumeTiming();
    ImageDelta delta = tracker->collect(candidates);
    capnp::MallocMessageBuilder message;
    fillMemoryOnly(message, delta);
    words += message.sizeInWords();
    tracker->acknowledge(delta);
  }
  state.counters["message_MiB"] =
      benchmark::Counter(static_cast<double>(words * sizeof(capnp::word)) / (1 << 20),
                         benchmark::Counter::kAvgIterations);
}
BENCHMARK(BM_BuildCheckpointMessage512MiB)
    ->ArgsProduct({{1, 5, 20}, {0, 1}, {1}})
    ->ArgsProduct({{5, 20}, {0, 1}, {0}})
    ->ArgNames({"pct", "diff", "scan"})
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime()
    ->Iterations(5);

/// cache:0 is the standby as it runs: its images are cached as its own unit
/// writes and reads leave them (ImageFile::recache sees to that after a VMM
/// ran on them). cache:1 shows what that avoids: the receiver's page cache is
/// what a sequential read leaves, in large folios where the kernel makes them.
/// The checkpoint a standby receives when 5 % of `f`'s source has changed
/// (Dirty Prev): the message, and the delta its payloads lie in.
struct FivePercentCheckpoint {
  explicit FivePercentCheckpoint(CheckpointFixture& f)
      : tracker(f.tracker(wire::Policy::DIRTY_PREV)) {
    f.change(5, 1);
    delta = tracker->collect(DirtyUnits{.everything = true});
    checkpoint = fillMemoryOnly(message, delta).asReader();
  }
  std::unique_ptr<ImageTracker> tracker;
  ImageDelta delta;
  capnp::MallocMessageBuilder message;
  wire::Checkpoint::Reader checkpoint;
};

/// Applies a checkpoint of 5 % of `f`'s source, changed, to its receiver at
/// every iteration; counts its payload as the bytes processed.
void applyFivePercent(benchmark::State& state, CheckpointFixture& f) {
  const FivePercentCheckpoint c(f);
  for (auto _ : state) {
    // As on a standby, which syncs its images after each checkpoint: the
    // pages a checkpoint writes are clean, not still dirty from the last one.
    state.PauseTiming();
    f.receiver->sync();
    state.ResumeTiming();
    applyCheckpoint(c.checkpoint, *f.receiver, *f.disk);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * c.delta.encodedBytes));
  state.counters["payload_MiB"] = static_cast<double>(c.delta.encodedBytes) / (1 << 20);
}

void BM_ApplyCheckpoint(benchmark::State& state) {
  CheckpointFixture f(512u << 20, state.range(0) != 0);
  applyFivePercent(state, f);
}
BENCHMARK(BM_ApplyCheckpoint)
    ->Arg(0)
    ->Arg(1)
    ->ArgName("cache")
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime();

/// A standby's journal of the 5 % checkpoint, written durably before its
/// apply: the copy of the received message, then its segments (flat:0) or a
/// flat copy of it (flat:1, as before) through io_uring with an fsync.
void BM_WriteJournal(benchmark::State& state) {
  const bool flat = state.range(0) != 0;
  CheckpointFixture f(512u << 20);
  const FivePercentCheckpoint received(f);
  const std::string path = (f.dir / "apply.journal").string();
  for (auto _ : state) {
    capnp::MallocMessageBuilder copy;
    copy.setRoot(received.checkpoint);
    if (flat) {
      auto words = capnp::messageToFlatArray(copy);
      auto bytes = words.asBytes();
      writeRecordFile(path, std::as_bytes(std::span(bytes.begin(), bytes.size())));
    } else {
      writeMessageRecordFile(path, copy);
    }
  }
  state.SetBytesProcessed(
      static_cast<std::int64_t>(state.iterations() * received.delta.encodedBytes));
}
BENCHMARK(BM_WriteJournal)
    ->Arg(0)
    ->Arg(1)
    ->ArgName("flat")
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime();

/// The name of the file system `path` is on.
std::string fileSystemName(const fs::path& path) {
  struct statfs info {};
  if (::statfs(path.c_str(), &info) != 0) return "unknown";
  switch (static_cast<unsigned long>(info.f_type)) {
    case EXT4_SUPER_MAGIC:
      return "ext4";
    case XFS_SUPER_MAGIC:
      return "xfs";
    case BTRFS_SUPER_MAGIC:
      return "btrfs";
    case TMPFS_MAGIC:
      return "tmpfs";
    default:
      return fmt::format("file system {:#x}", static_cast<unsigned long>(info.f_type));
  }
}

/// BM_ApplyCheckpoint/cache:0 with the receiver's unit writes one pwrite each
/// (ring:0) or through io_uring (ring:1), on the file system of
/// VMSYNC_BENCH_DIR (or /tmp). The label names the file system and what an
/// image left to choose (ImageWrites::automatic) writes with there.
void BM_ApplyCheckpointWrites(benchmark::State& state) {
  const bool ring = state.range(0) != 0;
  ::setenv("VMSYNC_IMAGE_WRITES", ring ? "io_uring" : "pwrite", 1);
  CheckpointFixture f(512u << 20);
  ::unsetenv("VMSYNC_IMAGE_WRITES");
  {
    // The choice is made at an image's first write.
    ImageFile probe((f.dir / "probe").string(), true, kUnitSize);
    const std::vector<std::byte> unit(kUnitSize, std::byte{1});
    const UnitWrite write{0, unit.data()};
    probe.writeUnits({&write, 1});
    state.SetLabel(fmt::format("{}, chosen: {}", fileSystemName(f.dir),
                               probe.writes() == ImageWrites::ring ? "io_uring" : "pwrite"));
  }
  applyFivePercent(state, f);
  if (f.receiver->writes() != (ring ? ImageWrites::ring : ImageWrites::pwrite))
    state.SkipWithError("the receiver did not write the way it was asked to");
}
BENCHMARK(BM_ApplyCheckpointWrites)
    ->Arg(0)
    ->Arg(1)
    ->ArgName("ring")
    ->Unit(benchmark::kMillisecond)
    ->MeasureProcessCPUTime();

}  // namespace
}  // namespace vmsync

BENCHMARK_MAIN();
