// Bringing a device whose image left the chain back to it (see resync.h):
// after a failover, for every online device past the resumable point; at
// registration, for a device that applied abandoned checkpoints or whose VM
// ran past its last checkpoint.
#include <spdlog/spdlog.h>

#include <filesystem>

#include "base/error.h"
#include "checkpoint/checkpoint_builder.h"
#include "resync.h"
#include "sync_server.h"
#include "transport/rpc_util.h"

namespace vmsync {

namespace fs = std::filesystem;

kj::Promise<void> SyncServer::rollBackDevices(std::uint64_t point) {
  kj::Vector<kj::Promise<void>> resynced;
  for (auto& [id, entry] : devices_) {
    if (!entry->peer || entry->applied <= point) continue;
    log_->info("failover: device {} applied up to {}; it is resynced to the chain at {}", id, entry->applied,
               point);
    resynced.add(
        resyncDevice(id, entry->connection, fmt::format("a failover resumed the VM from checkpoint {}", point)));
  }
  return kj::joinPromises(resynced.releaseAsArray());
}

kj::Promise<void> SyncServer::resyncDevice(const std::string& id, std::uint64_t connection, std::string why) {
  DeviceEntry& entry = device(id);
  // Its image is no checkpoint of the chain until the resync is done: it may
  // neither take the lease nor hold compaction back meanwhile.
  entry.resyncing = true;
  entry.applied = entry.queued = 0;
  // After whatever is on its way to the device, and after the resync before it.
  kj::Promise<void> forwarded = kj::READY_NOW;
  KJ_IF_MAYBE(tail, entry.tail) { forwarded = tail->addBranch(); }
  kj::Promise<void> earlier = kj::READY_NOW;
  KJ_IF_MAYBE(running, resyncs_) { earlier = running->addBranch(); }
  auto ignore = [](kj::Exception&&) {};
  auto step = kj::joinPromises(kj::arr(forwarded.catch_(ignore), earlier.catch_(ignore)))
                  .then([this, id, connection, why = kj::mv(why)]() mutable {
                    return resyncNow(id, connection, kj::mv(why));
                  })
                  .fork();
  entry.tail = step.addBranch().fork();
  resyncs_ = step.addBranch().fork();
  return step.addBranch();
}

kj::Promise<void> SyncServer::resyncNow(std::string id, std::uint64_t connection, std::string why) {
  DeviceEntry& entry = device(id);
  if (!entry.peer || entry.connection != connection) return kj::READY_NOW;
  const std::uint64_t start = nowNs();
  log_->info("device {}: resync ({}): asking for its unit hashes", id, why);
  return entry.peer->unitHashesRequest()
      .send()
      .then([this](capnp::Response<wire::DevicePeer::UnitHashesResults> response) {
        // Each get counts the whole list against the traversal limit: once each.
        auto ramList = response.getRam();
        auto diskList = response.getDisk();
        if (ramList.size() == 0) rpcFail("it has no image");
        std::vector<std::uint64_t> ram(ramList.size()), disk(diskList.size());
        for (unsigned i = 0; i < ram.size(); ++i) ram[i] = ramList[i];
        for (unsigned i = 0; i < disk.size(); ++i) disk[i] = diskList[i];
        return buildResyncOffThread(response.getAppliedSequence(), kj::mv(ram), kj::mv(disk));
      })
      .then([this, id, connection, start](std::shared_ptr<capnp::MallocMessageBuilder> message) -> kj::Promise<void> {
        DeviceEntry& entry = device(id);
        if (!entry.peer || entry.connection != connection) return kj::READY_NOW;
        auto resync = message->getRoot<wire::Checkpoint>().asReader();
        log_->info("device {}: resync to checkpoint {}: {} pages and {} blocks differ ({} bytes), built in {:.0f} ms",
                   id, resync.getSequence(), resync.getMemory().size(), resync.getDisk().size(),
                   message->sizeInWords() * sizeof(capnp::word), (nowNs() - start) / 1e6);
        auto request = entry.peer->rollBackRequest();
        request.setTo(resync.getSequence());
        request.setResync(resync);
        return finishResync(id, connection,
                            request.send().then([](capnp::Response<wire::DevicePeer::RollBackResults> response) {
                              return response.getAppliedSequence();
                            }));
      })
      .catch_([this, id, connection](kj::Exception&& e) -> kj::Promise<void> {
        DeviceEntry& entry = device(id);
        if (!entry.peer || entry.connection != connection) return kj::READY_NOW;
        log_->warn("device {}: resync failed ({}); it drops its image and starts over from the base", id,
                   describe(e));
        auto request = entry.peer->rollBackRequest();
        request.setTo(0);
        return finishResync(id, connection,
                            request.send().then([](capnp::Response<wire::DevicePeer::RollBackResults> response) {
                              return response.getAppliedSequence();
                            }))
            .catch_([this, id, connection](kj::Exception&& e) {
              DeviceEntry& entry = device(id);
              if (entry.connection != connection) return;
              entry.resyncing = false;
              entry.failure = fmt::format("it could not come back to the chain: {}", describe(e));
              log_->warn("device {}: {}", id, entry.failure);
            });
      });
}

kj::Promise<void> SyncServer::finishResync(std::string id, std::uint64_t connection,
                                           kj::Promise<std::uint64_t> applied) {
  return applied.then([this, id, connection](std::uint64_t at) {
    DeviceEntry& entry = device(id);
    if (entry.connection != connection) return;
    entry.applied = entry.queued = at;
    entry.resyncing = false;
    entry.failure.clear();
    persist();
    log_->info("device {}: back on the chain at checkpoint {} (head {})", id, at, store_.head());
    forwardUpTo(entry, store_.head());
  });
}

kj::Promise<std::shared_ptr<capnp::MallocMessageBuilder>> SyncServer::buildResyncOffThread(std::uint64_t from,
                                                                                   std::vector<std::uint64_t> ram,
                                                                                   std::vector<std::uint64_t> disk) {
  const std::uint64_t head = store_.head();
  if (head == 0) fail("the chain is empty");
  // The image at the head: the base, then every checkpoint after it (Prev),
  // or the head alone on the base (Orig).
  std::vector<std::uint64_t> sequences{store_.base()};
  if (head > store_.base()) {
    if (isOrigPolicy(store_.read(head)->reader().getPolicy())) {
      sequences.push_back(head);
    } else {
      for (std::uint64_t s = store_.first(); s <= head; ++s) sequences.push_back(s);
    }
  }
  // Hard links: a fold that commits meanwhile removes the chain's names, not the files.
  const std::string dir = fmt::format("{}/{}", store_.resyncDir(), ++resyncCount_);
  fs::create_directories(dir + "/chain");
  std::vector<std::string> paths;
  for (std::uint64_t s : sequences) {
    paths.push_back(fmt::format("{}/chain/{:08}", dir, s));
    fs::create_hard_link(store_.pathOf(s), paths.back());
  }
  if (resyncer_.joinable()) resyncer_.join();
  auto done = kj::newPromiseAndCrossThreadFulfiller<void>();
  // Shared with the worker; the last owner frees it.
  auto message = std::make_shared<capnp::MallocMessageBuilder>();
  auto outcome = std::make_shared<std::string>();  // written by the worker before it fulfils
  auto fulfiller = std::make_shared<kj::Own<kj::CrossThreadPromiseFulfiller<void>>>(kj::mv(done.fulfiller));
  resyncer_ = std::thread([this, paths = std::move(paths), dir, from, ram = std::move(ram), disk = std::move(disk),
                           message, outcome, fulfiller]() {
    try {
      buildResync(paths, dir + "/image", from, ram, disk, *message, cancelResync_);
    } catch (const std::exception& e) {
      *outcome = e.what();
    } catch (const kj::Exception& e) {
      *outcome = describe(e);
    }
    std::error_code ec;
    fs::remove_all(dir, ec);
    (*fulfiller)->fulfill();
  });
  return done.promise.then([this, message, outcome]() {
    resyncer_.join();
    if (!outcome->empty()) fail("{}", *outcome);
    return message;
  });
}

}  // namespace vmsync
