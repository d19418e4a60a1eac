#include "compactor.h"

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <filesystem>

#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/checkpoint_record.h"
#include "chain_image.h"
#include "checkpoint_store.h"
#include "base/crash_point.h"
#include "checkpoint/chunk_codec.h"
#include "base/error.h"
#include "vmm/image_file.h"
#include "transport/rpc_util.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

/// A fold writes its new base this many bytes at a time, each on the disk
/// before the next: the other VMs' pushes fsync meanwhile, and would wait
/// for the whole base (hundreds of MiB) were it handed to the disk at once.
constexpr std::size_t kFoldWriteWindow = 8u << 20;

/// Every non-zero unit of `image` as a whole chunk, lz4 where it helps. A full
/// checkpoint is applied on top of zeros, so zero units are left out.
std::uint64_t fillImage(const ImageFile& image, capnp::Orphanage orphanage,
                        capnp::Orphan<capnp::List<wire::Chunk>>& out, const std::atomic<bool>& cancel) {
  std::vector<std::uint64_t> nonZero;
  for (const UnitRun& run : image.dataRuns())  // units in holes are zero
    for (std::uint64_t i = run.first; i < run.end; ++i)
      if (!isZeroUnit(image.unit(i))) nonZero.push_back(i);
  out = orphanage.newOrphan<capnp::List<wire::Chunk>>(static_cast<unsigned>(nonZero.size()));
  auto list = out.get();
  for (unsigned i = 0; i < nonZero.size(); ++i) {
    if (cancel.load(std::memory_order_relaxed)) fail("compaction cancelled");
    toWire(encodeWhole(nonZero[i], image.unit(nonZero[i]), /*compress=*/true), list[i]);
  }
  return nonZero.size();
}

}  // namespace

FoldStats foldChain(const std::vector<std::string>& paths, const std::string& scratchDir, const std::string& out,
                    const std::atomic<bool>& cancel) {
  if (paths.size() < 2) fail("a fold needs the base and at least one checkpoint after it");
  ChainImage image(paths.front(), scratchDir, "fold");
  auto baseReader = image.base();
  auto spec = baseReader.getSpec();
  ImageFile& ram = image.ram();
  ImageFile& disk = image.disk();

  std::uint64_t expected = baseReader.getSequence();
  kj::Own<StoredCheckpoint> last;
  for (std::size_t i = 1; i < paths.size(); ++i) {
    if (cancel.load(std::memory_order_relaxed)) fail("compaction cancelled");
    last = readCheckpointFile(paths[i], "fold");
    auto c = last->reader();
    if (c.getBaseSequence() != expected || c.getKind() == wire::CheckpointKind::FULL)
      fail("cannot fold: checkpoint {} in {} does not follow checkpoint {}", c.getSequence(), paths[i], expected);
    if (isOrigPolicy(c.getPolicy())) fail("cannot fold: checkpoint {} is measured against the base", c.getSequence());
    applyCheckpoint(c, ram, disk);
    expected = c.getSequence();
  }

  auto top = last->reader();
  capnp::MallocMessageBuilder message;
  auto folded = message.initRoot<wire::Checkpoint>();
  folded.setVmId(top.getVmId());
  folded.setEpoch(top.getEpoch());
  folded.setSequence(top.getSequence());
  folded.setBaseSequence(0);
  folded.setKind(wire::CheckpointKind::FULL);
  folded.setPolicy(top.getPolicy());
  folded.setOrigin(top.getOrigin());
  folded.setCreatedUnixNs(top.getCreatedUnixNs());
  folded.setSpec(spec);
  FoldStats stats;
  stats.sequence = top.getSequence();
  stats.folded = paths.size();
  auto orphanage = message.getOrphanage();
  capnp::Orphan<capnp::List<wire::Chunk>> memory, blocks;
  stats.memoryUnits = fillImage(ram, orphanage, memory, cancel);
  stats.diskUnits = fillImage(disk, orphanage, blocks, cancel);
  folded.adoptMemory(kj::mv(memory));
  folded.adoptDisk(kj::mv(blocks));
  crashPoint("fold-before-write");
  // From the message's own segments: a flat copy of a large VM's image
  // would double what the fold holds in memory.
  writeMessageRecordFile(out, message, /*crashPoints=*/false, kFoldWriteWindow);
  stats.bytes = sizeof(RecordHeader) + capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word);
  return stats;
}

}  // namespace vmsync
