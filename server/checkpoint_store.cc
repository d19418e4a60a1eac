#include "checkpoint_store.h"

#include <capnp/serialize.h>
#include <fcntl.h>
#include <liburing.h>
#include <sys/uio.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint_record.h"
#include "durable_file.h"
#include "error.h"
#include "rpc_util.h"

namespace vmsync {

namespace fs = std::filesystem;

StoredCheckpoint::StoredCheckpoint(kj::Array<capnp::word> words)
    : words_(kj::mv(words)), message_(words_.asPtr(), rpcReaderOptions()) {}

namespace {

/// Writes `iov` to a new file `fd` at offset 0 and fsyncs it: one io_uring
/// submission of a write linked to an fsync (the fsync runs only after the
/// whole write completed). A short write is finished with pwrite, then fsync.
void writeAndSync(int fd, const std::string& path, std::span<const iovec> iov, std::size_t total) {
  io_uring ring{};
  int rc = io_uring_queue_init(2, &ring, 0);
  if (rc < 0) throwErrno(-rc, "cannot set up io_uring for the checkpoint log");
  io_uring_sqe* write = io_uring_get_sqe(&ring);
  io_uring_prep_writev(write, fd, iov.data(), static_cast<unsigned>(iov.size()), 0);
  write->flags |= IOSQE_IO_LINK;
  write->user_data = 1;
  io_uring_sqe* sync = io_uring_get_sqe(&ring);
  io_uring_prep_fsync(sync, fd, 0);
  sync->user_data = 2;
  rc = io_uring_submit_and_wait(&ring, 2);
  std::int64_t written = -1;
  int syncResult = -ECANCELED;
  for (int seen = 0; rc >= 0 && seen < 2; ++seen) {
    io_uring_cqe* cqe = nullptr;
    rc = io_uring_wait_cqe(&ring, &cqe);
    if (rc < 0) break;
    if (cqe->user_data == 1) written = cqe->res;
    else syncResult = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
  }
  io_uring_queue_exit(&ring);
  if (rc < 0) throwErrno(-rc, fmt::format("io_uring failed while writing {}", path));
  if (written < 0) throwErrno(static_cast<int>(-written), fmt::format("cannot write {}", path));
  if (static_cast<std::size_t>(written) < total) {
    // Short write (the linked fsync was cancelled): finish it by hand.
    std::size_t done = static_cast<std::size_t>(written);
    std::size_t base = 0;
    for (const iovec& part : iov) {
      while (done < base + part.iov_len) {
        const char* from = static_cast<const char*>(part.iov_base) + (done - base);
        ssize_t n = ::pwrite(fd, from, base + part.iov_len - done, static_cast<off_t>(done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) throwErrno(n < 0 ? errno : EIO, fmt::format("cannot write {}", path));
        done += static_cast<std::size_t>(n);
      }
      base += part.iov_len;
    }
    syncResult = ::fsync(fd) == 0 ? 0 : -errno;
  }
  if (syncResult < 0) throwErrno(-syncResult, fmt::format("cannot fsync {}", path));
}

void syncDirectory(const std::string& dir) {
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) throwLastErrno(fmt::format("cannot open directory {}", dir));
  int rc = ::fsync(dfd);
  int err = errno;
  ::close(dfd);
  if (rc != 0) throwErrno(err, fmt::format("cannot fsync directory {}", dir));
}

/// Reads exactly `size` bytes at `offset`; false at a premature end of file.
bool readExactly(int fd, void* into, std::size_t size, off_t offset, const std::string& path) {
  std::size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, static_cast<char*>(into) + done, size - done, offset + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throwLastErrno(fmt::format("cannot read checkpoint {}", path));
    if (n == 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

/// Reads and verifies the record in `path`: the payload words, or the reason
/// it is torn or damaged in `why`.
kj::Maybe<kj::Array<capnp::word>> readRecord(const std::string& path, std::string& why) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throwLastErrno(fmt::format("cannot open checkpoint {}", path));
  KJ_DEFER(::close(fd));
  struct stat st {};
  if (::fstat(fd, &st) != 0) throwLastErrno(fmt::format("cannot stat checkpoint {}", path));
  RecordHeader header{};
  if (static_cast<std::uint64_t>(st.st_size) < sizeof header ||
      !readExactly(fd, &header, sizeof header, 0, path)) {
    why = fmt::format("it has {} bytes, less than a record header", st.st_size);
    return nullptr;
  }
  why = checkRecordHeader(header, static_cast<std::uint64_t>(st.st_size) - sizeof header);
  if (!why.empty()) return nullptr;
  auto words = kj::heapArray<capnp::word>(header.length / sizeof(capnp::word));
  auto bytes = words.asBytes();
  if (!readExactly(fd, bytes.begin(), bytes.size(), sizeof header, path)) {
    why = "the file shrank while it was read";
    return nullptr;
  }
  why = checkRecordPayload(header, std::as_bytes(std::span(bytes.begin(), bytes.size())));
  if (!why.empty()) return nullptr;
  return kj::mv(words);
}

}  // namespace

CheckpointStore::CheckpointStore(std::string dataDir) : dir_(std::move(dataDir)) {
  fs::create_directories(dir_ + "/checkpoints");
  // Whole files only: a temporary left by a crash was never committed.
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
  // Every record is verified on start-up (as a log is replayed). A torn or
  // damaged record at the tail is dropped: it was never acknowledged, since
  // acknowledgement follows the commit and the commit follows the data fsync.
  // One below the tail is damage that must not be skipped silently.
  for (std::uint64_t s = 1; s <= head_; ++s) {
    std::string why;
    if (readRecord(checkpointPath(s), why) != nullptr) continue;
    if (s != head_)
      fail("data directory {}: checkpoint {} is damaged ({}) and newer ones depend on it; restore it from a backup",
           dir_, s, why);
    spdlog::warn("dropping torn checkpoint {} at the tail of the chain: {}", s, why);
    fs::rename(checkpointPath(s), checkpointPath(s) + ".torn");
    syncDirectory(dir_ + "/checkpoints");
    --head_;
    break;
  }
  std::ifstream in(dir_ + "/state.json");
  if (in) {
    try {
      auto j = nlohmann::json::parse(in);
      state_.vmId = j.value("vm_id", "");
      state_.epoch = j.value("epoch", 0ull);
      state_.holder = j.value("holder", "");
      const nlohmann::json devices = j.value("devices", nlohmann::json::object());
      for (const auto& [id, applied] : devices.items())
        state_.appliedByDevice[id] = std::min(applied.get<std::uint64_t>(), head_);
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
  if (bytes.size() > kMaxRecordPayload)
    fail("checkpoint {} is {} bytes, above the store's limit of {}", checkpoint.getSequence(), bytes.size(),
         kMaxRecordPayload);
  RecordHeader header = makeRecordHeader(std::as_bytes(std::span(bytes.begin(), bytes.size())));
  const std::string path = checkpointPath(head_ + 1);
  const std::string tmp = path + ".tmp";
  crashPoint("before-data-write");
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throwLastErrno(fmt::format("cannot create {}", tmp));
  {
    KJ_DEFER(::close(fd));
    iovec iov[2] = {{&header, sizeof header}, {bytes.begin(), bytes.size()}};
    writeAndSync(fd, tmp, iov, sizeof header + bytes.size());
  }
  crashPoint("after-data-fsync");
  // The commit: the rename makes the record part of the chain, the directory
  // fsync makes the rename durable.
  if (::rename(tmp.c_str(), path.c_str()) != 0) throwLastErrno(fmt::format("cannot rename {} into place", tmp));
  crashPoint("after-rename");
  syncDirectory(dir_ + "/checkpoints");
  crashPoint("after-commit");
  ++head_;
}

kj::Own<StoredCheckpoint> CheckpointStore::read(std::uint64_t sequence) const {
  if (sequence == 0 || sequence > head_) fail("checkpoint {} is not stored (the chain ends at {})", sequence, head_);
  std::string path = checkpointPath(sequence);
  std::string why;
  KJ_IF_MAYBE(words, readRecord(path, why)) { return kj::heap<StoredCheckpoint>(kj::mv(*words)); }
  fail("checkpoint {} is damaged: {}", path, why);
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
