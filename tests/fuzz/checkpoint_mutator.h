// Structure-aware mutation for the targets whose input is one Checkpoint
// message: the input is decoded, changed as a message (a numeric field, a
// list's length, a chunk's encoding, the order of the chunks, a data blob)
// and encoded again, so most mutants are well-formed messages that reach the
// checkpoint logic instead of the decoder's first check. An input that does
// not decode, and one mutant in four, take libFuzzer's byte mutation, so the
// decoder's own checks stay fuzzed.
#pragma once

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "fuzz_input.h"
#include "vmsync.capnp.h"

extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t maxSize);

namespace vmsync::fuzz {

/// Values at the edges of what the checks compare against.
inline std::uint64_t interestingNumber(std::minstd_rand& random, std::uint64_t old) {
  switch (random() % 8) {
    case 0: return 0;
    case 1: return 1;
    case 2: return old + 1;
    case 3: return old - 1;
    case 4: return std::numeric_limits<std::uint64_t>::max();
    case 5: return std::uint64_t{1} << (random() % 64);
    case 6: return old * 2;
    default: return random();
  }
}

/// A copy of `data` mutated by libFuzzer's byte mutator (grown by up to 64 bytes).
inline std::vector<std::uint8_t> mutateBlob(capnp::Data::Reader data) {
  std::vector<std::uint8_t> bytes(data.begin(), data.end());
  const std::size_t size = bytes.size();
  bytes.resize(size + 64);
  bytes.resize(LLVMFuzzerMutate(bytes.data(), size, bytes.size()));
  return bytes;
}

/// Rebuilds `list` with the chunk order changed: a swap, a duplicate, a drop,
/// or a new length (cut, or grown with zero chunks).
inline void reshapeChunks(std::minstd_rand& random, capnp::Orphanage orphanage,
                          capnp::List<wire::Chunk>::Builder list, capnp::Orphan<capnp::List<wire::Chunk>>& out) {
  std::vector<std::uint32_t> order;
  for (std::uint32_t i = 0; i < list.size(); ++i) order.push_back(i);
  const std::uint32_t n = static_cast<std::uint32_t>(order.size());
  switch (random() % 4) {
    case 0:
      if (n >= 2) std::swap(order[random() % n], order[random() % n]);
      break;
    case 1:
      if (n >= 1) order.insert(order.begin() + random() % (n + 1), order[random() % n]);
      break;
    case 2:
      if (n >= 1) order.erase(order.begin() + random() % n);
      break;
    default:
      order.resize(random() % 20, std::numeric_limits<std::uint32_t>::max());
      break;
  }
  out = orphanage.newOrphan<capnp::List<wire::Chunk>>(static_cast<unsigned>(order.size()));
  auto chunks = out.get();
  for (std::size_t i = 0; i < order.size(); ++i) {
    if (order[i] == std::numeric_limits<std::uint32_t>::max()) {
      chunks[i].setIndex(i);
      chunks[i].setEncoding(wire::ChunkEncoding::ZERO);
    } else {
      chunks.setWithCaveats(static_cast<unsigned>(i), list[order[i]].asReader());
    }
  }
}

/// One structural change of `checkpoint`.
inline void mutateCheckpoint(std::minstd_rand& random, capnp::MessageBuilder& message) {
  auto checkpoint = message.getRoot<wire::Checkpoint>();
  const bool memory = random() % 2 == 0 || !checkpoint.hasDisk();
  auto list = memory ? checkpoint.getMemory() : checkpoint.getDisk();
  const unsigned n = list.size();
  switch (random() % 11) {
    case 0: checkpoint.setSequence(interestingNumber(random, checkpoint.getSequence())); break;
    case 1: checkpoint.setBaseSequence(interestingNumber(random, checkpoint.getBaseSequence())); break;
    case 2: checkpoint.setEpoch(interestingNumber(random, checkpoint.getEpoch())); break;
    case 3:
      if (random() % 2) checkpoint.setKind(static_cast<wire::CheckpointKind>(random() % 4));
      else checkpoint.setPolicy(static_cast<wire::Policy>(random() % 5));
      break;
    case 4: {
      auto spec = checkpoint.getSpec();
      if (random() % 2) spec.setMemoryBytes(interestingNumber(random, spec.getMemoryBytes()));
      else spec.setDiskBytes(interestingNumber(random, spec.getDiskBytes()));
      break;
    }
    case 5: {  // a chunk's encoding, compression or sameAs reference
      if (n == 0) break;
      auto chunk = list[random() % n];
      switch (random() % 3) {
        case 0: chunk.setEncoding(static_cast<wire::ChunkEncoding>(random() % 6)); break;  // one past the last
        case 1: chunk.setCompression(static_cast<wire::Compression>(random() % 4)); break;
        default: chunk.setSameAs(static_cast<std::uint32_t>(interestingNumber(random, chunk.getSameAs()))); break;
      }
      break;
    }
    case 6: {  // a chunk's unit index or sizes
      if (n == 0) break;
      auto chunk = list[random() % n];
      switch (random() % 4) {
        case 0: chunk.setIndex(interestingNumber(random, chunk.getIndex())); break;
        case 1: chunk.setRawSize(static_cast<std::uint32_t>(interestingNumber(random, chunk.getRawSize()))); break;
        case 2: chunk.setBlob(static_cast<std::uint32_t>(random() % 3)); break;
        default: chunk.setBlobSize(static_cast<std::uint32_t>(interestingNumber(random, chunk.getBlobSize()))); break;
      }
      break;
    }
    case 7: case 8: {  // a chunk's payload, or a blob, through the byte mutator
      if (n != 0 && (random() % 3 != 0 || !checkpoint.hasBlobs())) {
        auto chunk = list[random() % n];
        auto bytes = mutateBlob(chunk.getData());
        chunk.setData(kj::arrayPtr(bytes.data(), bytes.size()));
      } else if (checkpoint.hasBlobs() && checkpoint.getBlobs().size() != 0) {
        auto blobs = checkpoint.getBlobs();
        const unsigned k = random() % blobs.size();
        auto bytes = mutateBlob(blobs[k]);
        blobs.set(k, kj::arrayPtr(bytes.data(), bytes.size()));
      }
      break;
    }
    case 9: {  // how a blob travels: plain or a zstd frame, and the size it claims
      const unsigned blobs = checkpoint.hasBlobs() ? checkpoint.getBlobs().size() : 0;
      if (blobs == 0) break;
      if (!checkpoint.hasBlobFrames() || checkpoint.getBlobFrames().size() == 0 || random() % 8 == 0) {
        auto frames = checkpoint.initBlobFrames(random() % 8 == 0 ? blobs + 1 : blobs);
        for (unsigned k = 0; k < blobs && k < frames.size(); ++k) frames[k].setRawSize(checkpoint.getBlobs()[k].size());
        break;
      }
      auto frames = checkpoint.getBlobFrames();
      auto frame = frames[random() % frames.size()];
      if (random() % 2) frame.setCompression(static_cast<wire::Compression>(random() % 4));
      else frame.setRawSize(interestingNumber(random, frame.getRawSize()));
      break;
    }
    default: {
      capnp::Orphan<capnp::List<wire::Chunk>> reshaped;
      reshapeChunks(random, message.getOrphanage(), list, reshaped);
      if (memory) checkpoint.adoptMemory(kj::mv(reshaped));
      else checkpoint.adoptDisk(kj::mv(reshaped));
      break;
    }
  }
}

/// The whole custom mutator: structural when the input decodes, else bytes.
inline std::size_t mutateCheckpointInput(std::uint8_t* data, std::size_t size, std::size_t maxSize,
                                         unsigned seed) {
  std::minstd_rand random(seed);
  if (random() % 4 == 0 || size < 8) return LLVMFuzzerMutate(data, size, maxSize);
  try {
    std::vector<capnp::word> words = inputWords(data, size);
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(words.data(), words.size()), inputLimits());
    capnp::MallocMessageBuilder message;
    message.setRoot(reader.getRoot<wire::Checkpoint>());
    const int rounds = 1 + static_cast<int>(random() % 3);
    for (int i = 0; i < rounds; ++i) mutateCheckpoint(random, message);
    // A fresh copy leaves out what the changes orphaned.
    capnp::MallocMessageBuilder compact;
    compact.setRoot(message.getRoot<wire::Checkpoint>().asReader());
    auto flat = capnp::messageToFlatArray(compact);
    auto bytes = flat.asBytes();
    if (bytes.size() > maxSize) return LLVMFuzzerMutate(data, size, maxSize);
    std::memcpy(data, bytes.begin(), bytes.size());
    return bytes.size();
  } catch (const kj::Exception&) {
    return LLVMFuzzerMutate(data, size, maxSize);
  }
}

}  // namespace vmsync::fuzz
