#include "harvest/unit_hashes.h"

#include <xxhash.h>

#include <cstring>

#include "vmm/image_file.h"
#include "base/thread_pool.h"
#include "harvest/unit_hash_avx2.h"
#include "base/units.h"

namespace vmsync {

namespace {

using HashFunction = std::uint64_t (*)(const void*, std::size_t);

HashFunction chooseHash() {
#ifdef VMSYNC_HAVE_AVX2_HASH
  if (__builtin_cpu_supports("avx2")) return hashBytesAvx2;
#endif
  return [](const void* data, std::size_t size) -> std::uint64_t { return XXH3_64bits(data, size); };
}

}  // namespace

std::uint64_t hashUnit(std::span<const std::byte> unit) {
  static const HashFunction hash = chooseHash();
  return hash(unit.data(), unit.size());
}

std::uint64_t hashUnitPortable(std::span<const std::byte> unit) { return XXH3_64bits(unit.data(), unit.size()); }

std::uint64_t zeroUnitHash() {
  static const std::uint64_t hash = [] {
    std::array<std::byte, kUnitSize> zero{};
    return hashUnit(zero);
  }();
  return hash;
}

std::vector<std::uint64_t> hashAllUnits(const ImageFile& image) {
  // Units in holes of the file read as zeros: they are not read at all.
  const std::vector<UnitRun> runs = image.dataRuns();
  image.prefetch(runs);  // what is not cached comes in by large reads, not a fault a page
  std::vector<std::uint64_t> hashes(image.units(), zeroUnitHash());
  // On every core, up to 4 MiB per task.
  const std::vector<UnitSpan> spans = spansByHoles(runs, image.units(), 1024);
  defaultThreadPool().parallelFor(spans.size(), 1, [&](std::size_t begin, std::size_t end) {
    for (std::size_t s = begin; s < end; ++s) {
      if (spans[s].hole) continue;
      for (std::uint64_t i = spans[s].first; i < spans[s].end; ++i)
        hashes[i] = hashUnit(image.unit(i));
    }
  });
  return hashes;
}

Digest imageDigest(std::span<const std::uint64_t> ramHashes, std::span<const std::uint64_t> diskHashes) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_128bits_reset(state);
  std::uint64_t counts[2] = {ramHashes.size(), diskHashes.size()};
  XXH3_128bits_update(state, counts, sizeof counts);
  XXH3_128bits_update(state, ramHashes.data(), ramHashes.size_bytes());
  XXH3_128bits_update(state, diskHashes.data(), diskHashes.size_bytes());
  XXH128_hash_t h = XXH3_128bits_digest(state);
  XXH3_freeState(state);
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, h);
  Digest digest;
  std::memcpy(digest.data(), canonical.digest, digest.size());
  return digest;
}

std::string toHex(std::span<const std::byte> bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (std::byte b : bytes) {
    out.push_back(digits[std::to_integer<unsigned>(b) >> 4]);
    out.push_back(digits[std::to_integer<unsigned>(b) & 15]);
  }
  return out;
}

}  // namespace vmsync
