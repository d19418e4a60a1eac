// zstd over whole blobs: a checkpoint built with it applies to the source's
// bytes under every policy and from either encoding path, is smaller than
// lz4 per chunk on guest-like pages, is the same bytes on any number of
// threads, and a hostile frame (corrupt, truncated, lying about its size, a
// decompression bomb) is refused by name before anything is written.
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <random>
#include <string>

#include "base/error.h"
#include "checkpoint/blob_frames.h"
#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "harvest/unit_hashes.h"
#include "test_env.h"

namespace vmsync {
namespace {

using testing::TempDir;

const PayloadCompression kZstd3{wire::Compression::ZSTD, 3};
const PayloadCompression kLz4{wire::Compression::LZ4, 0};

/// Guest-like pages: words from a small vocabulary with some noise, zero
/// pages and a few incompressible ones, changed where `seed` says.
void fillGuestLike(ImageFile& image, std::uint32_t seed) {
  static const char* const kWords[] = {"frame ", "buffer ", "0x7ffe ", "decode ", "\0\0\0\0", "vmsync ", "pixel "};
  std::mt19937 rng(seed);
  std::vector<std::byte> unit(kUnitSize);
  for (std::uint64_t i = 0; i < image.units(); ++i) {
    const unsigned kind = rng() % 8;
    if (kind == 0) continue;  // unchanged
    if (kind == 1) {
      std::fill(unit.begin(), unit.end(), std::byte{0});
    } else if (kind == 2) {
      for (auto& b : unit) b = static_cast<std::byte>(rng());
    } else {
      std::size_t at = 0;
      while (at < kUnitSize) {
        const char* word = kWords[rng() % std::size(kWords)];
        const std::size_t n = std::min<std::size_t>(word[0] ? std::strlen(word) : 4, kUnitSize - at);
        std::memcpy(unit.data() + at, word, n);
        at += n;
      }
      for (int k = 0; k < 16; ++k) unit[rng() % kUnitSize] = static_cast<std::byte>(rng());
    }
    image.writeUnit(i, unit);
  }
}

/// The message of `memory` (and an empty disk), flattened as the wire carries it.
kj::Array<capnp::word> flatten(const ImageDelta& memory, wire::Policy policy = wire::Policy::DIRTY_PREV,
                               wire::CheckpointKind kind = wire::CheckpointKind::FULL) {
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  checkpoint.setPolicy(policy);
  checkpoint.setKind(kind);
  toWire(memory, ImageDelta{}, checkpoint);
  return capnp::messageToFlatArray(message);
}

constexpr capnp::ReaderOptions kLarge{.traversalLimitInWords = 1u << 30};

void applyFlat(const kj::Array<capnp::word>& words, ImageFile& ram, ImageFile& disk) {
  capnp::FlatArrayMessageReader reader(words, kLarge);
  applyCheckpoint(reader.getRoot<wire::Checkpoint>(), ram, disk);
}

TEST(ZstdFrame, RoundTripsAndRefusesWhatIsNotExactlyOneFrameOfTheDeclaredSize) {
  std::vector<std::byte> raw(300000);
  for (std::size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<std::byte>((i * 7) % 251 < 40 ? i : 0);
  std::vector<std::byte> frame(zstdFrameBound(raw.size()));
  const std::size_t n = compressZstdFrame(raw, 3, frame);
  ASSERT_GT(n, 0u);
  ASSERT_LT(n, raw.size() / 4);
  frame.resize(n);
  std::vector<std::byte> out(raw.size());
  decompressZstdFrame(frame, out, "test");
  EXPECT_EQ(out, raw);

  auto refusal = [&](std::span<const std::byte> bytes, std::size_t declared) -> std::string {
    std::vector<std::byte> into(declared);
    try {
      decompressZstdFrame(bytes, into, "blob 7");
    } catch (const Error& e) {
      return e.what();
    }
    return "accepted";
  };
  // A bomb: the frame holds more than the message declared; nothing past the
  // declared size is written (the buffer is exactly that size, under ASan too).
  EXPECT_EQ(refusal(frame, 4096), "blob 7: the zstd frame says it holds 300000 bytes, the checkpoint says 4096");
  EXPECT_EQ(refusal(frame, raw.size() + 1),
            "blob 7: the zstd frame says it holds 300000 bytes, the checkpoint says 300001");
  EXPECT_NE(refusal(std::span(frame).first(n / 2), raw.size()).find("truncated or corrupt"), std::string::npos);
  std::vector<std::byte> trailing = frame;
  trailing.resize(n + 8);
  EXPECT_EQ(refusal(trailing, raw.size()), "blob 7: 8 bytes follow the zstd frame of " + std::to_string(n) + " bytes");
  std::vector<std::byte> garbage(64, std::byte{0x5a});
  EXPECT_EQ(refusal(garbage, 10), "blob 7: not a zstd frame");
  std::vector<std::byte> flipped = frame;
  for (std::size_t i = 20; i < n; i += 13) flipped[i] ^= std::byte{0x44};
  EXPECT_NE(refusal(flipped, raw.size()), "accepted");
  // Incompressible input is not framed at all.
  std::mt19937 rng(1);
  std::vector<std::byte> noise(8192);
  for (auto& b : noise) b = static_cast<std::byte>(rng());
  std::vector<std::byte> room(zstdFrameBound(noise.size()));
  EXPECT_EQ(compressZstdFrame(noise, 3, room), 0u);
}

// Every policy, several rounds, each checkpoint applied from its flattened
// message to a receiver: the receiver ends with the source's bytes, and the
// blobs travel as zstd frames, smaller in all than lz4 per chunk.
TEST(ZstdCheckpoint, EveryPolicyAppliesToTheSourcesBytesAndShipsFewerBytesThanLz4) {
  constexpr std::uint64_t kUnits = 2000;
  for (auto policy : {wire::Policy::DIRTY_PREV, wire::Policy::DIFF_PREV, wire::Policy::DIRTY_ORIG,
                      wire::Policy::DIFF_ORIG}) {
    TempDir dir;
    ImageFile source(dir / "src", true, kUnits * kUnitSize);
    ImageFile ram(dir / "ram", true, kUnits * kUnitSize);
    ImageFile disk(dir / "disk", true, kUnitSize);
    ImageFile base(dir / "base", true, kUnits * kUnitSize);
    ImageFile baseDisk(dir / "base-disk", true, kUnitSize);
    const auto zeros = std::vector<std::uint64_t>(kUnits, zeroUnitHash());
    ImageTracker zstd(source, zeros, policy, true);
    ImageTracker lz4(source, zeros, policy, true);
    zstd.setCompression(kZstd3);
    std::uint64_t zstdBytes = 0, lz4Bytes = 0;
    for (std::uint32_t round = 1; round <= 3; ++round) {
      fillGuestLike(source, round);
      ImageDelta a = zstd.collect(DirtyUnits{.everything = true});
      ImageDelta b = lz4.collect(DirtyUnits{.everything = true});
      ASSERT_FALSE(a.blobFrames.empty());
      EXPECT_EQ(a.blobFrames[0].compression, wire::Compression::ZSTD);
      EXPECT_TRUE(b.blobFrames.empty());
      zstdBytes += a.encodedBytes;
      lz4Bytes += b.encodedBytes;
      auto words = flatten(a, policy, round == 1 ? wire::CheckpointKind::FULL : wire::CheckpointKind::INCREMENTAL);
      {
        capnp::FlatArrayMessageReader reader(words, kLarge);
        const auto checkpoint = reader.getRoot<wire::Checkpoint>();
        for (auto chunk : checkpoint.getMemory()) EXPECT_NE(chunk.getCompression(), wire::Compression::LZ4);
        validateCheckpoint(checkpoint, ram.units(), disk.units());
        // Orig after the first: the receiver rebuilds base + checkpoint.
        const bool orig = isOrigPolicy(policy) && round > 1;
        applyCheckpoint(checkpoint, ram, disk, orig ? BaseImage{&base, &baseDisk} : BaseImage{});
      }
      EXPECT_EQ(hashAllUnits(ram), hashAllUnits(source)) << policyName(policy) << " round " << round;
      zstd.acknowledge(a);
      lz4.acknowledge(b);
      if (round == 1 && isOrigPolicy(policy)) {
        for (std::uint64_t i = 0; i < kUnits; ++i) base.writeUnit(i, ram.unit(i));
        zstd.setBase(base);
        lz4.setBase(base);
      }
    }
    EXPECT_LT(zstdBytes, lz4Bytes * 9 / 10) << policyName(policy) << ": zstd " << zstdBytes << ", lz4 " << lz4Bytes;
  }
}

// The pause path (copy now, encode later) frames the blobs too, and a
// message is the same bytes whatever the number of threads.
TEST(ZstdCheckpoint, EncodeLaterAndThreadCountGiveTheSameMessage) {
  constexpr std::uint64_t kUnits = 3000;
  TempDir dir;
  ImageFile source(dir / "src", true, kUnits * kUnitSize);
  fillGuestLike(source, 5);
  ThreadPool one(1), four(4);
  const auto zeros = std::vector<std::uint64_t>(kUnits, zeroUnitHash());
  ImageTracker serial(source, zeros, wire::Policy::DIRTY_PREV, true);
  ImageTracker parallel(source, zeros, wire::Policy::DIRTY_PREV, true);
  serial.setThreadPool(one);
  parallel.setThreadPool(four);
  serial.setCompression(kZstd3);
  parallel.setCompression(kZstd3);
  ImageDelta a = serial.collect(DirtyUnits{.everything = true});
  ImageDelta b = parallel.copyChanged(DirtyUnits{.everything = true});
  EXPECT_EQ(b.encodedBytes, 0u);
  parallel.encode(b);
  EXPECT_GT(a.blobs.size(), 1u);
  EXPECT_EQ(a.encodedBytes, b.encodedBytes);
  EXPECT_GT(a.encodeCpuSeconds, 0);
  EXPECT_TRUE(flatten(a).asBytes() == flatten(b).asBytes());
  ImageFile ram(dir / "ram", true, kUnits * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  applyFlat(flatten(b), ram, disk);
  EXPECT_EQ(hashAllUnits(ram), hashAllUnits(source));
}

/// A checkpoint of `chunks` whole chunks for units 0.., their payloads
/// (`units` of kUnitSize bytes) in one zstd blob that `edit` may spoil.
void framedCheckpoint(wire::Checkpoint::Builder checkpoint, const std::vector<std::byte>& units,
                      const std::function<void(std::vector<std::byte>& frame, wire::BlobFrame::Builder info)>& edit) {
  const unsigned chunks = static_cast<unsigned>(units.size() / kUnitSize);
  std::vector<std::byte> frame(zstdFrameBound(units.size()));
  frame.resize(compressZstdFrame(units, 3, frame));
  auto info = checkpoint.initBlobFrames(1)[0];
  info.setCompression(wire::Compression::ZSTD);
  info.setRawSize(units.size());
  edit(frame, info);
  checkpoint.initBlobs(1).set(0, kj::arrayPtr(reinterpret_cast<const kj::byte*>(frame.data()), frame.size()));
  auto list = checkpoint.initMemory(chunks);
  for (unsigned i = 0; i < chunks; ++i) {
    list[i].setIndex(i);
    list[i].setEncoding(wire::ChunkEncoding::WHOLE);
    list[i].setRawSize(kUnitSize);
    list[i].setBlob(1);
    list[i].setBlobOffset(i * kUnitSize);
    list[i].setBlobSize(kUnitSize);
  }
  checkpoint.initDisk(0);
}

std::string refusalOf(const std::function<void(std::vector<std::byte>&, wire::BlobFrame::Builder)>& edit,
                      bool applyIt = true) {
  TempDir dir;
  ImageFile ram(dir / "ram", true, 8 * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  std::vector<std::byte> units(4 * kUnitSize);
  for (std::size_t i = 0; i < units.size(); ++i) units[i] = static_cast<std::byte>(i % 5 == 0 ? i / 5 : 1);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  checkpoint.setSequence(12);
  framedCheckpoint(checkpoint, units, edit);
  std::string why = "accepted";
  try {
    if (applyIt)
      applyCheckpoint(checkpoint.asReader(), ram, disk);
    else
      validateCheckpoint(checkpoint.asReader(), ram.units(), disk.units());
  } catch (const Error& e) {
    why = e.what();
  }
  if (why == "accepted") {
    for (std::uint64_t i = 0; i < 4 && applyIt; ++i)
      EXPECT_EQ(hashUnit(ram.unit(i)), hashUnit(std::span(units).subspan(i * kUnitSize, kUnitSize)));
  } else {
    EXPECT_EQ(hashAllUnits(ram), std::vector<std::uint64_t>(8, zeroUnitHash())) << "written before refusing: " << why;
  }
  return why;
}

TEST(ZstdCheckpoint, HostileFramesAreRefusedByNameBeforeAnythingIsWritten) {
  auto keep = [](std::vector<std::byte>&, wire::BlobFrame::Builder) {};
  EXPECT_EQ(refusalOf(keep), "accepted");
  EXPECT_EQ(refusalOf(keep, false), "accepted");
  // A size past what 4 chunks can hold is refused before any allocation:
  // the declared size, not the frame, decides how much is allocated.
  EXPECT_EQ(refusalOf([](auto&, auto info) { info.setRawSize(std::uint64_t{1} << 40); }),
            "checkpoint 12: blob 1 says it decompresses to 1099511627776 bytes; its 4 chunks hold at most 16384 in all");
  // A bomb: a frame of much more than the chunks hold, declared honestly.
  EXPECT_EQ(refusalOf([](std::vector<std::byte>& frame, auto info) {
              std::vector<std::byte> zeros(std::size_t{64} << 20);
              frame.resize(zstdFrameBound(zeros.size()));
              frame.resize(compressZstdFrame(zeros, 1, frame));
              info.setRawSize(zeros.size());
            }),
            "checkpoint 12: blob 1 says it decompresses to 67108864 bytes; its 4 chunks hold at most 16384 in all");
  // The same frame, declared small: stopped by the size in its header.
  EXPECT_NE(refusalOf([](std::vector<std::byte>& frame, auto) {
              std::vector<std::byte> zeros(std::size_t{64} << 20);
              frame.resize(zstdFrameBound(zeros.size()));
              frame.resize(compressZstdFrame(zeros, 1, frame));
            }).find("the zstd frame says it holds 67108864 bytes, the checkpoint says 16384"),
            std::string::npos);
  EXPECT_NE(refusalOf([](std::vector<std::byte>& frame, auto) { frame.resize(frame.size() - 3); }).find("blob 1"),
            std::string::npos);
  EXPECT_NE(refusalOf([](std::vector<std::byte>& frame, auto) {
              for (std::size_t i = 8; i < frame.size(); i += 5) frame[i] ^= std::byte{0x21};
            }),
            "accepted");
  EXPECT_EQ(refusalOf([](auto&, auto info) { info.setCompression(wire::Compression::LZ4); }),
            "checkpoint 12: blob 1 has compression 1, which applies to chunks, not blobs");
  const std::string plain = refusalOf([](auto&, auto info) { info.setCompression(wire::Compression::NONE); });
  EXPECT_EQ(plain.rfind("checkpoint 12: blob 1 is plain with ", 0), 0u) << plain;
  EXPECT_NE(plain.find("bytes, but its frame says 16384"), std::string::npos) << plain;
}

TEST(ZstdCheckpoint, ZstdOnASingleChunkIsRefused) {
  TempDir dir;
  ImageFile ram(dir / "ram", true, 2 * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  auto chunk = checkpoint.initMemory(1)[0];
  chunk.setEncoding(wire::ChunkEncoding::WHOLE);
  chunk.setCompression(wire::Compression::ZSTD);
  chunk.setRawSize(kUnitSize);
  chunk.initData(16);
  checkpoint.initDisk(0);
  try {
    applyCheckpoint(checkpoint.asReader(), ram, disk);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("zstd compresses whole blobs (blobFrames), not a single chunk"),
              std::string::npos)
        << e.what();
  }
}

TEST(ZstdCheckpoint, BlobFramesMustDescribeEveryBlob) {
  TempDir dir;
  ImageFile ram(dir / "ram", true, 2 * kUnitSize);
  ImageFile disk(dir / "disk", true, kUnitSize);
  capnp::MallocMessageBuilder message;
  auto checkpoint = message.initRoot<wire::Checkpoint>();
  checkpoint.setSequence(3);
  checkpoint.initBlobs(2);
  checkpoint.initBlobFrames(1);
  checkpoint.initMemory(0);
  checkpoint.initDisk(0);
  try {
    applyCheckpoint(checkpoint.asReader(), ram, disk);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "checkpoint 3: 1 blob frames for 2 blobs");
  }
}

}  // namespace
}  // namespace vmsync
