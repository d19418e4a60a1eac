#include "checkpoint_store.h"

#include <capnp/serialize.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "durable_file.h"
#include "error.h"
#include "rpc_util.h"

namespace vmsync {

namespace fs = std::filesystem;

StoredCheckpoint::StoredCheckpoint(kj::Array<capnp::word> words)
    : words_(kj::mv(words)), message_(words_.asPtr(), rpcReaderOptions()) {}

CheckpointStore::CheckpointStore(std::string dataDir) : dir_(std::move(dataDir)) {
  fs::create_directories(dir_ + "/checkpoints");
  // Whole files only: a temporary left by a crash is not part of the chain.
  for (const auto& entry : fs::directory_iterator(dir_ + "/checkpoints")) {
    const std::string name = entry.path().filename().string();
    if (name.ends_with(".tmp")) {
      spdlog::info("discarding {} left by an interrupted write", name);
      fs::remove(entry.path());
      continue;
    }
    if (!name.ends_with(".ckpt")) continue;
    std::uint64_t seq = std::stoull(name.substr(0, name.size() - 5));
    head_ = std::max(head_, seq);
  }
  for (std::uint64_t s = 1; s <= head_; ++s)
    if (!fs::exists(checkpointPath(s))) fail("data directory {}: checkpoint {} is missing below head {}", dir_, s, head_);
  std::ifstream in(dir_ + "/state.json");
  if (in) {
    try {
      auto j = nlohmann::json::parse(in);
      state_.vmId = j.value("vm_id", "");
      state_.epoch = j.value("epoch", 0ull);
      state_.holder = j.value("holder", "");
      const nlohmann::json devices = j.value("devices", nlohmann::json::object());
      for (const auto& [id, applied] : devices.items()) state_.appliedByDevice[id] = applied.get<std::uint64_t>();
    } catch (const nlohmann::json::exception& e) {
      fail("data directory {}: state.json is unreadable: {}", dir_, e.what());
    }
  }
}

std::string CheckpointStore::checkpointPath(std::uint64_t sequence) const {
  return fmt::format("{}/checkpoints/{:020}.ckpt", dir_, sequence);
}

void CheckpointStore::append(wire::Checkpoint::Reader checkpoint) {
  capnp::MallocMessageBuilder message;
  message.setRoot(checkpoint);
  auto words = capnp::messageToFlatArray(message);
  auto bytes = words.asBytes();
  writeFileDurably(checkpointPath(head_ + 1), bytes.begin(), bytes.size());
  ++head_;
}

kj::Own<StoredCheckpoint> CheckpointStore::read(std::uint64_t sequence) const {
  std::string path = checkpointPath(sequence);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throwLastErrno(fmt::format("cannot open checkpoint {}", path));
  struct stat st {};
  ::fstat(fd, &st);
  if (st.st_size % sizeof(capnp::word) != 0) {
    ::close(fd);
    fail("checkpoint {} is damaged: {} bytes is not a whole number of words", path, st.st_size);
  }
  auto words = kj::heapArray<capnp::word>(static_cast<std::size_t>(st.st_size) / sizeof(capnp::word));
  auto bytes = words.asBytes();
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::pread(fd, bytes.begin() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      int err = n < 0 ? errno : EIO;
      ::close(fd);
      throwErrno(err, fmt::format("cannot read checkpoint {}", path));
    }
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  return kj::heap<StoredCheckpoint>(kj::mv(words));
}

void CheckpointStore::saveState(const ServerState& state) {
  nlohmann::json j;
  j["vm_id"] = state.vmId;
  j["epoch"] = state.epoch;
  j["holder"] = state.holder;
  j["devices"] = nlohmann::json::object();
  for (const auto& [id, applied] : state.appliedByDevice) j["devices"][id] = applied;
  std::string text = j.dump(2);
  writeFileDurably(dir_ + "/state.json", text.data(), text.size());
  state_ = state;
}

}  // namespace vmsync
