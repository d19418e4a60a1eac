#include "resync.h"

#include <filesystem>

#include "base/durable_file.h"
#include "base/error.h"
#include "checkpoint/checkpoint_applier.h"
#include "checkpoint/checkpoint_builder.h"
#include "checkpoint/checkpoint_record.h"
#include "checkpoint/chunk_codec.h"
#include "checkpoint/device_state_codec.h"
#include "chain_image.h"
#include "checkpoint_store.h"
#include "harvest/unit_hashes.h"
#include "vmm/image_file.h"

namespace vmsync {

namespace fs = std::filesystem;

namespace {

/// The units of `image` whose hash is not the device's, whole or zero.
std::uint64_t differingUnits(const ImageFile& image, const std::vector<std::uint64_t>& chain,
                             const std::vector<std::uint64_t>& device, capnp::Orphanage orphanage,
                             capnp::Orphan<capnp::List<wire::Chunk>>& out, const std::atomic<bool>& cancel) {
  std::vector<std::uint64_t> differ;
  for (std::uint64_t i = 0; i < chain.size(); ++i)
    if (chain[i] != device[i]) differ.push_back(i);
  out = orphanage.newOrphan<capnp::List<wire::Chunk>>(static_cast<unsigned>(differ.size()));
  auto list = out.get();
  for (unsigned i = 0; i < differ.size(); ++i) {
    if (cancel.load(std::memory_order_relaxed)) fail("resync cancelled");
    toWire(encodeWhole(differ[i], image.unit(differ[i]), /*compress=*/true), list[i]);
  }
  return differ.size();
}

}  // namespace

ResyncStats buildResync(const std::vector<std::string>& paths, const std::string& scratchDir, std::uint64_t from,
                        const std::vector<std::uint64_t>& ramHashes, const std::vector<std::uint64_t>& diskHashes,
                        capnp::MessageBuilder& out, const std::atomic<bool>& cancel) {
  if (paths.empty()) fail("a resync needs the chain's base");
  ChainImage image(paths.front(), scratchDir, "resync");
  auto baseReader = image.base();
  auto spec = baseReader.getSpec();
  if (ramHashes.size() != spec.getMemoryBytes() / kUnitSize || diskHashes.size() != spec.getDiskBytes() / kUnitSize)
    fail("cannot resync: the device's image has {} pages and {} blocks, the VM {} and {}", ramHashes.size(),
         diskHashes.size(), spec.getMemoryBytes() / kUnitSize, spec.getDiskBytes() / kUnitSize);
  ImageFile& ram = image.ram();
  ImageFile& disk = image.disk();

  kj::Own<StoredCheckpoint> last;
  std::uint64_t expected = baseReader.getSequence();
  for (std::size_t i = 1; i < paths.size(); ++i) {
    if (cancel.load(std::memory_order_relaxed)) fail("resync cancelled");
    last = readCheckpointFile(paths[i], "resync");
    auto c = last->reader();
    if (c.getKind() == wire::CheckpointKind::FULL) fail("cannot resync: {} is a second full checkpoint", paths[i]);
    if (isOrigPolicy(c.getPolicy())) {
      // Measured against the base alone: the last one is the image.
      if (paths.size() != 2) fail("cannot resync: an Orig chain is the base and one checkpoint, not {}", paths.size());
      ram.sync();
      disk.sync();
      copySparse(ram.path(), scratchDir + "/base-ram.img");
      copySparse(disk.path(), scratchDir + "/base-disk.img");
      ImageFile baseRam(scratchDir + "/base-ram.img", false);
      ImageFile baseDisk(scratchDir + "/base-disk.img", false);
      applyCheckpoint(c, ram, disk, BaseImage{&baseRam, &baseDisk});
    } else {
      if (c.getBaseSequence() != expected)
        fail("cannot resync: checkpoint {} in {} does not follow checkpoint {}", c.getSequence(), paths[i], expected);
      applyCheckpoint(c, ram, disk);
    }
    expected = c.getSequence();
  }
  auto top = last ? last->reader() : baseReader;

  const std::vector<std::uint64_t> chainRam = hashAllUnits(ram);
  const std::vector<std::uint64_t> chainDisk = hashAllUnits(disk);
  ResyncStats stats;
  stats.sequence = top.getSequence();
  stats.final = top.getKind() == wire::CheckpointKind::FINAL;
  if (stats.final) {
    const Digest digest = imageDigest(chainRam, chainDisk);
    auto expectedDigest = top.getImageDigest();
    if (expectedDigest.size() != digest.size() ||
        !std::equal(digest.begin(), digest.end(), reinterpret_cast<const std::byte*>(expectedDigest.begin())))
      fail("cannot resync: the chain's image at checkpoint {} does not match its digest", stats.sequence);
  }

  auto resync = out.initRoot<wire::Checkpoint>();
  resync.setVmId(top.getKind() == wire::CheckpointKind::FULL ? spec.getVmId() : top.getVmId());
  resync.setEpoch(top.getEpoch());
  resync.setSequence(stats.sequence);
  resync.setBaseSequence(from);
  resync.setKind(stats.final ? wire::CheckpointKind::FINAL : wire::CheckpointKind::INCREMENTAL);
  // Whole units that replace the device's: what a Dirty Prev checkpoint is.
  resync.setPolicy(wire::Policy::DIRTY_PREV);
  resync.setOrigin(top.getOrigin());
  resync.setCreatedUnixNs(top.getCreatedUnixNs());
  resync.setResync(true);
  if (stats.final) {
    copyDeviceState(top, resync);
    resync.setImageDigest(top.getImageDigest());
    resync.setVmContinued(top.getVmContinued());
  }
  auto orphanage = out.getOrphanage();
  capnp::Orphan<capnp::List<wire::Chunk>> memory, blocks;
  stats.memoryUnits = differingUnits(ram, chainRam, ramHashes, orphanage, memory, cancel);
  stats.diskUnits = differingUnits(disk, chainDisk, diskHashes, orphanage, blocks, cancel);
  resync.adoptMemory(kj::mv(memory));
  resync.adoptDisk(kj::mv(blocks));
  return stats;
}

}  // namespace vmsync
